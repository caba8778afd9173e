"""A small OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

It serves ``POST /<endpoint>/v1/chat/completions`` (any endpoint name, so that two models on
"different providers" are told apart), streaming or not, and ``POST /<endpoint>/v1/embeddings``
(deterministic vectors, see ``vector``; the answer names the key that served it, and
``embedded`` lists each item of every batch answered whole), records every request, and can be
told to fail: per key or endpoint, the next N requests (or all) answer 429 (optionally with
Retry-After), 500, 503, 400, 401, 403 or 404, close the connection without answering, stream one
chunk and then cut the connection, answer 200 with something that is not JSON (malformed),
not answer at all until ``release()`` (hang), or stream one chunk and the rest only after
``release()`` (stall); a key named ``fail-BEHAVIOUR`` (fail-429, fail-429:1) always gets that
fault. Its answer says which endpoint and key it saw, so a test can tell which member
answered: ``answer from a with sk-work``. What it shares with local_anthropic.py (the fault
rules, hang and release, recording) is in local_server.py.

    python tests/local_openai.py --port 8765    # run it by hand
"""

from __future__ import annotations

import array
import base64
import json
import time
import zlib

import local_server
from local_server import Recorded  # noqa: F401 (part of this module's API)

TOOL_MARKER = "CALL_TOOL"
STATUSES = ("429", "500", "503", "401", "403", "404", "400")
DIMENSIONS = 32  # of a vector, unless the request asks for other dimensions


def vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The vector of a text, the same on every call: a 1, then how many of its words fall in
    each bucket (by their CRC-32); texts that share words are close."""
    values = [0.0] * dimensions
    values[0] = 1.0
    for word in text.lower().split():
        values[1 + zlib.crc32(word.encode()) % (dimensions - 1)] += 1.0
    return values


class Handler(local_server.Handler):
    server: "LocalOpenAI._Server"

    def key(self) -> str:
        return self.headers.get("authorization", "").removeprefix("Bearer ")

    def respond(self, route, body, endpoint, key, behaviour):
        owner = self.server.owner
        if behaviour == "close":
            self.cut()
            return
        if behaviour.split(":")[0] in STATUSES:
            self._error(behaviour)
            return
        if behaviour == "quota":  # OpenAI's answer when the account's quota is spent
            error = {
                "message": "You exceeded your current quota, please check your plan",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
            self.send_json(429, {"error": error}, self.fault_headers(""))
            return
        if route[-1:] == ["embeddings"]:
            self._embeddings(body, key, behaviour)
            return
        if behaviour == "malformed":
            self._malformed(stream=bool(body.get("stream")))
            return
        text, tool_calls = owner._answer(endpoint, key, body)
        if body.get("stream"):
            self._stream(body, text, tool_calls, behaviour)
        else:
            self.send_json(200, self._completion(body, text, tool_calls))

    def _error(self, behaviour: str):
        status, _, retry_after = behaviour.partition(":")
        owner = self.server.owner
        message = owner.error_message or {
            429: "Rate limit reached",
            401: "Invalid key",
            404: "The model does not exist",
        }.get(int(status), "Failure")
        error = {"error": {"message": message, "type": "test"}}
        if owner.error_body is not None:
            error = owner.error_body
        self.send_json(int(status), error, self.fault_headers(retry_after))

    def _embeddings(self, body, key, behaviour):
        "A vector per input, as floats or (as the openai SDK asks by default) base64 float32."
        if behaviour == "malformed":
            self.send_body(200, b'{"object": "list", "data": [ not JSON')
            return
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = body.get("dimensions") or DIMENSIONS
        data = []
        for index, text in enumerate(inputs):
            values = vector(text, dimensions)
            if body.get("encoding_format") == "base64":
                values = base64.b64encode(array.array("f", values).tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": values})
        tokens = sum(len(text.split()) for text in inputs)
        answer = {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "served_by": key,
        }
        if behaviour != "cut":  # recorded before it is sent: a client that has it sees it here
            self.server.owner._embedded(key, inputs)
        self.send_json(200, answer, cut=behaviour == "cut")

    def _malformed(self, stream: bool):
        "HTTP 200, but what follows is not JSON: a whole body, or the first data: line."
        if not stream:
            self.send_body(200, b'{"id": "chatcmpl-test", "choices": [ not JSON')
            return
        self.start_stream()
        for data in (b'data: {"id": "chatcmpl-test", not JSON\n\n', b"data: [DONE]\n\n", b""):
            self.chunk(data)

    def _usage(self, body, text):
        "A word a token; or what the test set (``usage``: prompt_tokens and completion_tokens)."
        given = self.server.owner.usage
        if given is not None:
            return {**given, "total_tokens": sum(given.values())}
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_tokens + len(text.split()),
        }

    def _completion(self, body, text, tool_calls):
        message = {"role": "assistant", "content": text if not tool_calls else None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                }
            ],
            "usage": self._usage(body, text),
        }

    def _stream(self, body, text, tool_calls, behaviour):
        owner = self.server.owner
        self.start_stream()

        def send(delta=None, finish=None, usage=None):
            chunk = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": []
                if usage
                else [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
            }
            if usage:
                chunk["usage"] = usage
            self.chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            owner._chunk_sent()

        if tool_calls:
            send(
                {
                    "role": "assistant",
                    "tool_calls": [dict(tc, index=i) for i, tc in enumerate(tool_calls)],
                }
            )
            send(finish="tool_calls")
        else:
            words = text.split(" ")
            for number, word in enumerate(words):
                if number:
                    self.pause_between_words()
                send({"content": word + (" " if number < len(words) - 1 else "")})
                if number == 0 and behaviour == "cut":
                    self.cut()
                    return
                if number == 0 and behaviour == "stall" and not self.stall():
                    return
            send(finish="stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            send(usage=self._usage(body, text))
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")  # the last, empty chunk: the stream is complete


class LocalOpenAI(local_server.LocalServer):
    "Start with ``start()``; ``url`` is http://127.0.0.1:PORT; ``stop()`` when done."

    handler = Handler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded: list[tuple[str, str]] = []  # (key, item): each item of a whole answer
        self.usage: dict | None = None  # the usage every answer reports (None: its words)

    def _embedded(self, key: str, inputs: list) -> None:
        with self._lock:
            self.embedded.extend((key, text) for text in inputs)

    def api_base(self, endpoint: str) -> str:
        return f"{self.url}/{endpoint}/v1"

    def _answer(self, endpoint: str, key: str, body: dict):
        "The text (or tool calls) to answer with."
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        if last.get("role") == "tool":
            return f"tool said {last.get('content')} via {endpoint} with {key}", None
        if body.get("tools") and TOOL_MARKER in str(last.get("content")):
            name = body["tools"][0]["function"]["name"]
            call = {
                "id": f"call_{endpoint}_{len(self.requests)}",
                "type": "function",
                "function": {"name": name, "arguments": "{}"},
            }
            return "", [call]
        return f"answer from {endpoint} with {key}", None


if __name__ == "__main__":
    local_server.main(
        LocalOpenAI,
        "A local OpenAI-compatible test server",
        8765,
        lambda server: f"api_base {server.api_base('a')}",
    )
