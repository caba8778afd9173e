"""A small Anthropic Messages API server on 127.0.0.1 for tests, like local_openai.py.

It serves ``POST /<endpoint>/v1/messages`` (any endpoint name, so that two models on
"different providers" are told apart; the anthropic SDK's ``base_url`` is ``base_url(endpoint)``),
streaming (server-sent events, as llm-anthropic always asks for) or not, and
``POST /<endpoint>/v1/messages/count_tokens``. It records every request and can be told to
fail: per key or endpoint, the next N requests (or all) answer 429 (optionally with
Retry-After), 500, 503, 529 (overloaded), 400, 401, 403 or 404 with an error body shaped like
Anthropic's; close the connection without answering (close); stream the start of an answer and
cut the connection (cut); answer 200 with something that is not JSON (malformed); or not answer
at all until ``release()`` (hang). A key named ``fail-BEHAVIOUR`` (fail-429, fail-429:1) always
gets that fault. Its answer says which endpoint and key it saw: ``answer from a with sk-ant-a``.

    python tests/local_anthropic.py --port 8766    # run it by hand
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

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


class Recorded(dict):
    "One request: path, endpoint, key, body (parsed JSON), time."


def _text_of(content) -> str:
    "The text of a message's content: a string, or the text blocks of a list of blocks."
    if isinstance(content, str):
        return content
    return " ".join(
        block.get("text", "")
        for block in content or []
        if isinstance(block, dict) and block.get("type") == "text"
    )


class Handler(BaseHTTPRequestHandler):
    server: "LocalAnthropic._Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        owner = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        route = urlsplit(self.path).path.strip("/").split("/")
        endpoint = route[0]
        key = self.headers.get("x-api-key") or self.headers.get("authorization", "")
        key = key.removeprefix("Bearer ")  # x-api-key, or an auth token
        owner._record(
            Recorded(path=self.path, endpoint=endpoint, key=key, body=body, time=time.monotonic())
        )
        behaviour = owner._behaviour(endpoint, key)
        released = False
        if behaviour == "hang":
            if not owner._hold():  # the server is stopping: no answer at all
                self.close_connection = True
                return
            behaviour, released = "ok", True
        try:
            self._respond(route[1:], body, endpoint, key, behaviour)
        except (BrokenPipeError, ConnectionResetError):
            if released:
                owner._released_done(answered=False)
            raise
        if released:
            owner._released_done(answered=True)

    def _respond(self, route, body, endpoint, key, behaviour):
        owner = self.server.owner
        if behaviour == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour.split(":")[0].isdigit():
            self._error(behaviour)
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
            self._stream(body, blocks, cut=behaviour == "cut")
        else:
            self._json(200, self._message(body, blocks), cut=behaviour == "cut")

    def _error(self, behaviour: str):
        status, _, retry_after = behaviour.partition(":")
        owner = self.server.owner
        headers = {"request-id": f"req_local_{len(owner.requests)}"}
        if owner.no_sdk_retries:
            headers["x-should-retry"] = "false"
        if retry_after:
            headers["retry-after"] = retry_after
        kind, message = ERRORS.get(int(status), ("api_error", "Failure"))
        error = {"type": "error", "error": {"type": kind, "message": message}}
        self._json(int(status), dict(error, request_id=headers["request-id"]), headers)

    def _json(self, status: int, data: dict, headers=None, cut=False):
        payload = json.dumps(data).encode()
        self.send_response(status, "Overloaded" if status == 529 else None)  # not in http.server
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if cut:  # half the promised body, then the connection closes
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)

    def _malformed(self, stream: bool):
        if not stream:
            payload = b'{"id": "msg_local", "type": "message", not JSON'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self._start_stream()
        self._chunk(b"event: message_start\ndata: {not JSON\n\n")
        self._chunk(b"")

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

    def _start_stream(self):
        # Chunked, as the API streams: a connection closed before the last (empty) chunk is
        # then a cut the client can tell from the end of the answer.
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, body, blocks, cut):
        owner = self.server.owner
        self._start_stream()

        def send(event: str, **data):
            data = {"type": event, **data}
            self._chunk(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            owner.last_chunk_sent = time.monotonic()

        usage = self._usage(body, blocks)
        message = dict(self._message(body, []), stop_reason=None)
        message["usage"] = {"input_tokens": usage["input_tokens"], "output_tokens": 1}
        send("message_start", message=message)
        self._chunk(b'event: ping\ndata: {"type": "ping"}\n\n')

        def delta(index, **data):
            send("content_block_delta", index=index, delta=data)

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
                        time.sleep(owner.chunk_delay)
                    piece = word + (" " if number < len(words) - 1 else "")
                    delta(index, type="text_delta", text=piece)
                    if cut:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
            send("content_block_stop", index=index)
        send(
            "message_delta",
            delta={"stop_reason": self._stop_reason(blocks), "stop_sequence": None},
            usage={"output_tokens": usage["output_tokens"]},
        )
        send("message_stop")
        self._chunk(b"")  # the last, empty chunk: the stream is complete


class LocalAnthropic:
    "Start with ``start()``; ``url`` is http://127.0.0.1:PORT; ``stop()`` when done."

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: "LocalAnthropic"

        def handle_error(self, request, client_address):
            # A client that stops reading a stream (or a cut we made) is not an error here.
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    def __init__(self, port: int = 0, chunk_delay: float = 0.0, no_sdk_retries: bool = True):
        self.requests: list[Recorded] = []
        self.chunk_delay = chunk_delay
        # Tell the anthropic SDK not to retry errors itself (x-should-retry: false), so that
        # tests see each failure once. Connection errors (close) are still retried by the SDK.
        self.no_sdk_retries = no_sdk_retries
        self.last_chunk_sent = None
        # Set (and counted) each time a request held by hang has been released and its whole
        # answer written; released_broken counts those whose client had gone by then.
        self.released_and_answered = threading.Event()
        self.released_answers = 0
        self.released_broken = 0
        self._rules: list[list] = []  # [endpoint or None, key or None, behaviour, times left]
        self._lock = threading.Lock()
        self._hang = threading.Condition()
        self._hung = 0
        self._releases = 0
        self._stopping = False
        self._server = self._Server(("127.0.0.1", port), Handler)
        self._server.owner = self
        # stop() waits for serve_forever to notice: poll often, not every half second
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def base_url(self, endpoint: str) -> str:
        "What the anthropic SDK takes as base_url (or ANTHROPIC_BASE_URL) for this endpoint."
        return f"{self.url}/{endpoint}"

    def start(self) -> "LocalAnthropic":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._hang:  # requests still held by hang end without an answer
            self._stopping = True
            self._hang.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, behaviour: str, *, endpoint=None, key=None, times=None) -> None:
        """Answer matching requests with ``behaviour``: 429, 429:RETRY_AFTER, 500, 503, 529,
        400, 401, 403, 404, close, cut, malformed or hang; ``times`` requests, or all of them
        when None."""
        with self._lock:
            self._rules.append([endpoint, key, behaviour, times])

    def heal(self) -> None:
        with self._lock:
            self._rules.clear()

    # --- hang ----------------------------------------------------------------------------

    @property
    def hung(self) -> int:
        "How many requests hang is holding now."
        with self._hang:
            return self._hung

    def wait_hung(self, count: int = 1, timeout: float = 10.0) -> bool:
        "Wait until hang holds at least ``count`` requests; False if it did not in time."
        with self._hang:
            return self._hang.wait_for(lambda: self._hung >= count, timeout)

    def release(self) -> None:
        "Let every request hang is holding go on and answer normally."
        with self._hang:
            self._releases += 1
            self._hang.notify_all()

    def wait_released(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until ``count`` released requests have finished writing their answers (or
        found their client gone); False if they did not in time."""
        with self._hang:
            return self._hang.wait_for(
                lambda: self.released_answers + self.released_broken >= count, timeout
            )

    def _hold(self) -> bool:
        "Hold a request until release(); False when the server stops first."
        with self._hang:
            releases = self._releases
            self._hung += 1
            self._hang.notify_all()
            self._hang.wait_for(lambda: self._releases != releases or self._stopping)
            self._hung -= 1
            return not self._stopping

    def _released_done(self, answered: bool) -> None:
        with self._hang:
            if answered:
                self.released_answers += 1
            else:
                self.released_broken += 1
            self._hang.notify_all()
        if answered:
            self.released_and_answered.set()

    # ---------------------------------------------------------------------------------------

    def _behaviour(self, endpoint: str, key: str) -> str:
        if key.startswith("fail-"):  # a key can carry its own fault: fail-429, fail-429:1 ...
            return key[len("fail-") :]
        with self._lock:
            for rule in self._rules:
                if rule[0] not in (None, endpoint) or rule[1] not in (None, key):
                    continue
                if rule[3] is not None:
                    if rule[3] <= 0:
                        continue
                    rule[3] -= 1
                return rule[2]
        return "ok"

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)

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

    def seen(self, field: str) -> list:
        "One field of every recorded request, in order: seen('key'), seen('endpoint')."
        with self._lock:
            return [request[field] for request in self.requests]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A local Anthropic Messages API test server")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    server = LocalAnthropic(args.port, args.chunk_delay, no_sdk_retries=False).start()
    print(f"serving on {server.url} (base_url {server.base_url('a')})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
