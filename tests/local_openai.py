"""A small OpenAI-compatible server on 127.0.0.1 for tests and benchmarks.

It serves ``POST /<endpoint>/v1/chat/completions`` (any endpoint name, so that two models on
"different providers" are told apart), streaming or not, records every request, and can be
told to fail: per key or endpoint, the next N requests (or all) answer 429 (optionally with
Retry-After), 500, 503, 400, 401, 403 or 404, close the connection without answering, stream one
chunk and then cut the connection, answer 200 with something that is not JSON (malformed), or
not answer at all until ``release()`` (hang); a key named ``fail-BEHAVIOUR`` (fail-429,
fail-429:1) always gets that fault. Its answer says which endpoint and key it saw, so a test
can tell which member answered: ``answer from a with sk-work``.

    python tests/local_openai.py --port 8765    # run it by hand
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL_MARKER = "CALL_TOOL"


class Recorded(dict):
    "One request: path, endpoint, key, body (parsed JSON), time."


class Handler(BaseHTTPRequestHandler):
    server: "LocalOpenAI._Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        owner = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        endpoint = self.path.strip("/").split("/")[0]
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
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
            self._respond(body, endpoint, key, behaviour)
        except (BrokenPipeError, ConnectionResetError):
            if released:
                owner._released_done(answered=False)
            raise
        if released:
            owner._released_done(answered=True)

    def _respond(self, body, endpoint, key, behaviour):
        owner = self.server.owner
        if behaviour == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if behaviour.split(":")[0] in ("429", "500", "503", "401", "403", "404", "400"):
            self._error(behaviour)
            return
        if behaviour == "malformed":
            self._malformed(stream=bool(body.get("stream")))
            return
        text, tool_calls = owner._answer(endpoint, key, body)
        if body.get("stream"):
            self._stream(body, text, tool_calls, cut=behaviour == "cut")
        else:
            self._json(200, self._completion(body, text, tool_calls))

    def _error(self, behaviour: str):
        status, _, retry_after = behaviour.partition(":")
        headers = {"x-should-retry": "false"} if self.server.owner.no_sdk_retries else {}
        if retry_after:
            headers["retry-after"] = retry_after
        message = {
            429: "Rate limit reached",
            401: "Invalid key",
            404: "The model does not exist",
        }.get(int(status), "Failure")
        self._json(int(status), {"error": {"message": message, "type": "test"}}, headers)

    def _json(self, status: int, data: dict, headers=None):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _malformed(self, stream: bool):
        "HTTP 200, but what follows is not JSON: a whole body, or the first data: line."
        if not stream:
            payload = b'{"id": "chatcmpl-test", "choices": [ not JSON'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for data in (b'data: {"id": "chatcmpl-test", not JSON\n\n', b"data: [DONE]\n\n", b""):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    @staticmethod
    def _usage(body, text):
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

    def _stream(self, body, text, tool_calls, cut):
        owner = self.server.owner
        # Chunked, as OpenAI's API streams: a connection closed before the last (empty) chunk
        # is then a cut the client can tell from the end of the answer.
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def write(data: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

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
            write(f"data: {json.dumps(chunk)}\n\n".encode())
            owner.last_chunk_sent = time.monotonic()

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
                    time.sleep(owner.chunk_delay)
                send({"content": word + (" " if number < len(words) - 1 else "")})
                if cut:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
            send(finish="stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            send(usage=self._usage(body, text))
        write(b"data: [DONE]\n\n")
        write(b"")  # the last, empty chunk: the stream is complete


class LocalOpenAI:
    "Start with ``start()``; ``url`` is http://127.0.0.1:PORT; ``stop()`` when done."

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: "LocalOpenAI"

        def handle_error(self, request, client_address):
            # A client that stops reading a stream (or a cut we made) is not an error here.
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                super().handle_error(request, client_address)

    def __init__(self, port: int = 0, chunk_delay: float = 0.0, no_sdk_retries: bool = True):
        self.requests: list[Recorded] = []
        self.chunk_delay = chunk_delay
        # Tell the openai SDK not to retry errors itself (x-should-retry: false), so that tests
        # see each failure once; the benchmark turns this off to measure llm as it is.
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

    def api_base(self, endpoint: str) -> str:
        return f"{self.url}/{endpoint}/v1"

    def start(self) -> "LocalOpenAI":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._hang:  # requests still held by hang end without an answer
            self._stopping = True
            self._hang.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, behaviour: str, *, endpoint=None, key=None, times=None) -> None:
        """Answer matching requests with ``behaviour``: 429, 429:RETRY_AFTER, 500, 503, 401,
        403, 404, 400, close, cut, malformed or hang; ``times`` requests, or all of them when
        None."""
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

    def seen(self, field: str) -> list:
        "One field of every recorded request, in order: seen('key'), seen('endpoint')."
        with self._lock:
            return [request[field] for request in self.requests]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A local OpenAI-compatible test server")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    server = LocalOpenAI(args.port, args.chunk_delay, no_sdk_retries=False).start()
    print(f"serving on {server.url} (api_base {server.api_base('a')})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
