"""A small Anthropic Messages API server on 127.0.0.1 for tests, like local_openai.py.

It serves ``POST /<endpoint>/v1/messages`` (any endpoint name, so that two models on
"different providers" are told apart; the anthropic SDK's ``base_url`` is ``base_url(endpoint)``),
streaming (server-sent events, as llm-anthropic always asks for) or not, and
``POST /<endpoint>/v1/messages/count_tokens``. It records every request and can be told to
fail: per key or endpoint, the next N requests (or all) answer 429 (optionally with
Retry-After), 500, 503, 529 (overloaded), 400, 401, 403 or 404 with an error body shaped like
Anthropic's; close the connection without answering (close); stream the start of an answer and
cut the connection (cut); answer 200 with something that is not JSON (malformed); not answer
at all until ``release()`` (hang); or stream the start of an answer and the rest only after
``release()`` (stall). A key named ``fail-BEHAVIOUR`` (fail-429, fail-429:1) always gets that
fault. Its answer says which endpoint and key it saw: ``answer from a with sk-ant-a``. What it
shares with local_openai.py (the fault rules, hang and release, recording) is in
local_server.py.

    python tests/local_anthropic.py --port 8766    # run it by hand
"""

from __future__ import annotations

import json

import local_server
from local_server import Recorded  # noqa: F401 (part of this module's API)

TOOL_MARKER = "CALL_TOOL"
THINKING_TEXT = "thinking about it"
SIGNATURE = "sig-local-anthropic"
ERRORS = {  # status: (Anthropic's error type, message)
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use this resource"),
    404: ("not_found_error", "model: not found"),
    429: ("rate_limit_error", "Rate limit reached"),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable"),
    529: ("overloaded_error", "Overloaded"),
}


def _text_of(content) -> str:
    "The text of a message's content: a string, or the text blocks of a list of blocks."
    if isinstance(content, str):
        return content
    return " ".join(
        block.get("text", "")
        for block in content or []
        if isinstance(block, dict) and block.get("type") == "text"
    )


class Handler(local_server.Handler):
    server: "LocalAnthropic._Server"

    def key(self) -> str:
        key = self.headers.get("x-api-key") or self.headers.get("authorization", "")
        return key.removeprefix("Bearer ")  # x-api-key, or an auth token

    def respond(self, route, body, endpoint, key, behaviour):
        owner = self.server.owner
        if behaviour == "close":
            self.cut()
            return
        if behaviour.split(":")[0].isdigit():
            self._error(behaviour)
            return
        if behaviour == "quota":  # Anthropic's answer when the account has no credit left
            message = (
                "Your credit balance is too low to access the Anthropic API. Please go to "
                "Plans & Billing to upgrade or purchase credits."
            )
            error = {"type": "invalid_request_error", "message": message}
            self._json(400, {"type": "error", "error": error}, self.fault_headers(""))
            return
        if route == ["v1", "messages", "count_tokens"]:
            self._json(200, {"input_tokens": self._input_tokens(body)})
            return
        if route != ["v1", "messages"]:
            self._error("404")
            return
        if behaviour == "malformed":
            self._malformed(stream=bool(body.get("stream")))
            return
        blocks = owner._answer(endpoint, key, body)
        if body.get("stream"):
            self._stream(body, blocks, behaviour)
        else:
            self._json(200, self._message(body, blocks), cut=behaviour == "cut")

    def _error(self, behaviour: str):
        status, _, retry_after = behaviour.partition(":")
        owner = self.server.owner
        headers = {"request-id": f"req_local_{len(owner.requests)}"}
        headers.update(self.fault_headers(retry_after))
        kind, message = ERRORS.get(int(status), ("api_error", "Failure"))
        error = {"type": "error", "error": {"type": kind, "message": message}}
        self._json(int(status), dict(error, request_id=headers["request-id"]), headers)

    def _json(self, status: int, data: dict, headers=None, cut=False):
        reason = "Overloaded" if status == 529 else None  # not in http.server
        self.send_json(status, data, headers, reason, cut)

    def _malformed(self, stream: bool):
        if not stream:
            self.send_body(200, b'{"id": "msg_local", "type": "message", not JSON')
            return
        self.start_stream({"cache-control": "no-cache"})
        self.chunk(b"event: message_start\ndata: {not JSON\n\n")
        self.chunk(b"")

    @staticmethod
    def _input_tokens(body) -> int:
        return sum(len(_text_of(m.get("content")).split()) for m in body.get("messages") or [])

    def _usage(self, body, blocks) -> dict:
        text = " ".join(b["text"] for b in blocks if b["type"] == "text")
        return {"input_tokens": self._input_tokens(body), "output_tokens": len(text.split())}

    @staticmethod
    def _stop_reason(blocks) -> str:
        return "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"

    def _message(self, body, blocks) -> dict:
        return {
            "id": "msg_local",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": blocks,
            "stop_reason": self._stop_reason(blocks),
            "stop_sequence": None,
            "usage": self._usage(body, blocks),
        }

    def _stream(self, body, blocks, behaviour):
        owner = self.server.owner
        self.start_stream({"cache-control": "no-cache"})

        def send(event: str, **data):
            data = {"type": event, **data}
            self.chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            owner._chunk_sent()

        usage = self._usage(body, blocks)
        message = dict(self._message(body, []), stop_reason=None)
        message["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
        send("message_start", message=message)
        self.chunk(b'event: ping\ndata: {"type": "ping"}\n\n')

        def delta(index, **data):
            send("content_block_delta", index=index, delta=data)

        first_text = True
        for index, block in enumerate(blocks):
            if block["type"] == "thinking":
                start = dict(block, thinking="", signature="")
                send("content_block_start", index=index, content_block=start)
                if block["thinking"]:
                    delta(index, type="thinking_delta", thinking=block["thinking"])
                delta(index, type="signature_delta", signature=block["signature"])
            elif block["type"] == "tool_use":
                send("content_block_start", index=index, content_block=dict(block, input={}))
                delta(index, type="input_json_delta", partial_json=json.dumps(block["input"]))
            else:
                start = {"type": "text", "text": ""}
                send("content_block_start", index=index, content_block=start)
                words = block["text"].split(" ")
                for number, word in enumerate(words):
                    if number:
                        self.pause_between_words()
                    piece = word + (" " if number < len(words) - 1 else "")
                    delta(index, type="text_delta", text=piece)
                    if first_text and behaviour == "cut":
                        self.cut()
                        return
                    if first_text and behaviour == "stall" and not self.stall():
                        return
                    first_text = False
            send("content_block_stop", index=index)
        send(
            "message_delta",
            delta={"stop_reason": self._stop_reason(blocks), "stop_sequence": None},
            usage={"output_tokens": usage["output_tokens"]},
        )
        send("message_stop")
        self.chunk(b"")  # the last, empty chunk: the stream is complete


class LocalAnthropic(local_server.LocalServer):
    "Start with ``start()``; ``url`` is http://127.0.0.1:PORT; ``stop()`` when done."

    handler = Handler

    def base_url(self, endpoint: str) -> str:
        "What the anthropic SDK takes as base_url (or ANTHROPIC_BASE_URL) for this endpoint."
        return f"{self.url}/{endpoint}"

    def _answer(self, endpoint: str, key: str, body: dict) -> list[dict]:
        "The content blocks to answer with: thinking if asked for, then text or a tool call."
        blocks = []
        thinking = body.get("thinking") or {}
        if thinking.get("type") in ("enabled", "adaptive"):
            omitted = thinking.get("display") == "omitted"
            text = "" if omitted else THINKING_TEXT
            blocks.append({"type": "thinking", "thinking": text, "signature": SIGNATURE})
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        content = last.get("content")
        results = [
            block
            for block in (content if isinstance(content, list) else [])
            if isinstance(block, dict) and block.get("type") == "tool_result"
        ]
        if results:
            said = results[-1].get("content")
            if isinstance(said, list):
                said = _text_of(said)
            text = f"tool said {said} via {endpoint} with {key}"
            blocks.append({"type": "text", "text": text})
        elif body.get("tools") and TOOL_MARKER in _text_of(content):
            with self._lock:
                number = len(self.requests)
            blocks.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_{endpoint}_{number}",
                    "name": body["tools"][0]["name"],
                    "input": {},
                }
            )
        else:
            blocks.append({"type": "text", "text": f"answer from {endpoint} with {key}"})
        return blocks


if __name__ == "__main__":
    local_server.main(
        LocalAnthropic,
        "A local Anthropic Messages API test server",
        8766,
        lambda server: f"base_url {server.base_url('a')}",
    )
