"""What tests/local_openai.py and tests/local_anthropic.py share: a threaded HTTP server on
127.0.0.1 that records every request and fails as it is told, and a request handler that a
protocol's handler completes with its routes, bodies, streaming format and error shapes.

Faults are rules per endpoint (the first part of the path) and/or key: ``fail(behaviour,
endpoint=, key=, times=, after=)`` answers the next ``times`` matching requests (or all of
them) with ``behaviour``, once ``after`` of them have been answered normally; a key named ``fail-BEHAVIOUR`` (fail-429, fail-429:1) always gets that fault.
The behaviours every protocol has:

- an HTTP status, optionally with Retry-After in seconds: ``429``, ``429:7``, ``429:0.001``;
- ``close``: the connection closes without an answer;
- ``cut``: the stream is cut after its first chunk of text;
- ``malformed``: HTTP 200, and then something that is not JSON;
- ``hang``: no answer at all until ``release()``, then the normal answer;
- ``stall``: the stream's first chunk of text, then nothing more until ``release()``, then the
  rest: a test can read the first chunk while the server provably still holds the last;
- ``quota``: the provider's own answer when the account's quota or credit is spent;
- ``slow:SECONDS``: the normal answer, after that delay (a slower provider, for benchmarks;
  ``--slow KEY=SECONDS`` when run by hand).

``hung`` counts the requests held now (by hang or stall), ``wait_hung()`` waits for them,
``wait_released()`` for the answers of released ones; ``stop()`` ends held requests without
an answer. Each protocol module runs a server by hand: ``python tests/local_openai.py --port
8765 [--chunk-delay 0.02]``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def _ports():
    """This process's ports to give: a range of its own per pytest-xdist worker (gw0, gw1, ...),
    below those the system hands out for port 0 (Linux from 32768, macOS and Windows from
    49152), in turn. So no other worker's server takes a port a test lets go of for a moment
    (a Redis server stopped and started again on it) or keeps free (a member where nothing
    listens), and no two calls of one process give the same one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    base = 20000 + 1000 * (int(worker[2:]) % 12 if worker[2:].isdigit() else 0)
    while True:
        yield from range(base, base + 1000)


_PORTS = _ports()


def free_port() -> int:
    "A port nothing listens on now, on 127.0.0.1, and that no other test worker will take."
    for port in _PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken (or, on Windows, a range the system keeps)
                continue
            return port


class Recorded(dict):
    "One request: path, endpoint, key, body (parsed JSON), time."


class Handler(BaseHTTPRequestHandler):
    """Reads, records and classifies a POST; a protocol's handler answers it with
    ``respond()`` and says where its key is with ``key()``."""

    server: "LocalServer._Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def key(self) -> str:
        raise NotImplementedError

    def respond(self, route: list, body: dict, endpoint: str, key: str, behaviour: str):
        "Answer: ``route`` is the path after the endpoint, split at '/'."
        raise NotImplementedError

    def do_POST(self):
        owner = self.server.owner
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        route = urlsplit(self.path).path.strip("/").split("/")
        endpoint, key = route[0], self.key()
        now = time.perf_counter()
        owner._record(Recorded(path=self.path, endpoint=endpoint, key=key, body=body, time=now))
        behaviour = owner._behaviour(endpoint, key)
        self.released = False  # held by hang or stall, and then released
        if behaviour == "hang":
            if not self.hold():  # the server is stopping: no answer at all
                return
            behaviour = "ok"
        elif behaviour.startswith("slow:"):  # a slower provider: the answer after a delay
            time.sleep(float(behaviour.partition(":")[2]))
            behaviour = "ok"
        try:
            self.respond(route[1:], body, endpoint, key, behaviour)
        except ConnectionError:  # (broken pipe, reset, or on Windows aborted: the client left)
            if self.released:
                owner._released_done(answered=False)
            raise
        if self.released:
            owner._released_done(answered=True)

    def hold(self) -> bool:
        """Hold this request until ``release()``; False when the server stops first (the
        connection is then closed, unanswered or cut)."""
        if self.server.owner._hold():
            self.released = True
            return True
        self.close_connection = True
        return False

    def stall(self) -> bool:
        "In a stream: hold what is left until ``release()``; False (and cut) if stopped."
        if self.hold():
            return True
        self.cut()
        return False

    # --- writing -------------------------------------------------------------------------

    def cut(self):
        "Close the connection now, whatever was promised."
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client had gone already
            pass

    def send_body(self, status: int, payload: bytes, headers=None, reason=None, cut=False):
        "A JSON (or would-be JSON) body with its length; ``cut``: half of it, then close."
        self.send_response(status, reason)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if cut:
            self.wfile.write(payload[: len(payload) // 2])
            self.cut()
            return
        self.wfile.write(payload)

    def send_json(self, status: int, data: dict, headers=None, reason=None, cut=False):
        self.send_body(status, json.dumps(data).encode(), headers, reason, cut)

    def fault_headers(self, retry_after: str) -> dict:
        """Headers of an error answer: x-should-retry (unless SDKs may retry), Retry-After, and
        the test's ``error_headers``."""
        owner = self.server.owner
        headers = {"x-should-retry": "false"} if owner.no_sdk_retries else {}
        if retry_after:
            headers["retry-after"] = retry_after
        headers.update(owner.error_headers)
        return headers

    def start_stream(self, headers=None):
        # Chunked, as the APIs stream: a connection closed before the last (empty) chunk is
        # then a cut the client can tell from the end of the answer.
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

    def chunk(self, data: bytes):
        "One chunk of a chunked body; b'' is the last one."
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def pause_between_words(self):
        "The server's chunk_delay, between two chunks of text (the benchmark sets it)."
        delay = self.server.owner.chunk_delay
        if delay:
            time.sleep(delay)


class LocalServer:
    "Start with ``start()``; ``url`` is http://127.0.0.1:PORT; ``stop()`` when done."

    handler: type = Handler  # each protocol's own

    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        owner: "LocalServer"

        def handle_error(self, request, client_address):
            # A client that stops reading a stream (or a cut we made) is not an error here.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    def __init__(self, port: int = 0, chunk_delay: float = 0.0, no_sdk_retries: bool = True):
        self.requests: list[Recorded] = []
        self.chunk_delay = chunk_delay
        # Tell the SDKs not to retry errors themselves (x-should-retry: false), so that tests
        # see each failure once; the benchmark turns this off to measure llm as it is.
        self.no_sdk_retries = no_sdk_retries
        self.last_chunk_sent = None  # time.monotonic() of the last chunk any stream sent
        # Set (and counted) each time a request held by hang or stall has been released and
        # its whole answer written; released_broken counts those whose client had gone.
        self.released_and_answered = threading.Event()
        self.released_answers = 0
        self.released_broken = 0
        # What an error answer (an HTTP status behaviour) carries beside its own: more headers,
        # another message, or a whole other body (a test sets them: a provider's stated reset)
        self.error_headers: dict[str, str] = {}
        self.error_message: str | None = None
        self.error_body = None
        # [endpoint or None, key or None, behaviour, times left, normal answers left before]
        self._rules: list[list] = []
        self._lock = threading.Lock()
        self._hang = threading.Condition()
        self._hung = 0
        self._releases = 0
        self._stopping = False
        self._server = self._Server(("127.0.0.1", port), self.handler)
        self._server.owner = self
        # stop() waits for serve_forever to notice: poll often, not every half second
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._hang:  # requests still held end without an answer
            self._stopping = True
            self._hang.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, behaviour: str, *, endpoint=None, key=None, times=None, after=0) -> None:
        """Answer matching requests with ``behaviour`` (an HTTP status, STATUS:RETRY_AFTER,
        close, cut, malformed, hang or stall); ``times`` requests, or all of them when None;
        the first ``after`` matching requests are answered normally (a fault mid-job)."""
        with self._lock:
            self._rules.append([endpoint, key, behaviour, times, after])

    def heal(self) -> None:
        with self._lock:
            self._rules.clear()

    def seen(self, field: str) -> list:
        "One field of every recorded request, in order: seen('key'), seen('endpoint')."
        with self._lock:
            return [request[field] for request in self.requests]

    # --- hang and stall ------------------------------------------------------------------

    @property
    def hung(self) -> int:
        "How many requests hang or stall is holding now."
        with self._hang:
            return self._hung

    def wait_hung(self, count: int = 1, timeout: float = 10.0) -> bool:
        "Wait until at least ``count`` requests are held; False if they were not in time."
        with self._hang:
            return self._hang.wait_for(lambda: self._hung >= count, timeout)

    def release(self) -> None:
        "Let every request held now go on and answer normally."
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
                if rule[4] > 0:
                    rule[4] -= 1
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

    def _chunk_sent(self) -> None:
        self.last_chunk_sent = time.monotonic()


def main(server_class, description: str, default_port: int, describe) -> None:
    """Run a server by hand (or from bench/run.py) until Ctrl-C, the SDKs' retries left as
    they are; ``describe(server)`` completes the "serving on URL (...)" line."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument(
        "--slow",
        action="append",
        default=[],
        metavar="KEY=SECONDS",
        help="answer requests with this key only after this delay (repeatable)",
    )
    args = parser.parse_args()
    server = server_class(args.port, args.chunk_delay, no_sdk_retries=False).start()
    for rule in args.slow:
        key, _, seconds = rule.partition("=")
        server.fail(f"slow:{float(seconds)}", key=key)
    print(f"serving on {server.url} ({describe(server)})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
