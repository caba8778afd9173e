"""A real redis-server on 127.0.0.1 for the tests: a free port, no persistence, stopped
afterwards; it can be stopped and started again on the same port mid-test."""

import os
import shutil
import subprocess

import pytest

from local_server import free_port


class RedisServer:
    def __init__(self, password: str | None = None):
        if shutil.which("redis-server") is None:
            # skipped, visibly, where none installs (Windows); .ci/run sets LB_REQUIRE_REDIS,
            # and there a missing server fails the tests
            message = (
                "redis-server is not installed: apt-get install redis-server, brew install redis"
            )
            if os.environ.get("LB_REQUIRE_REDIS"):
                raise RuntimeError(message)
            pytest.skip(message)
        self.password = password
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        for _ in range(5):  # another process may take the port between choosing and binding
            command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            command += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
            if self.password:
                command += ["--requirepass", self.password]
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            if self._ready():
                return self
            self.process.kill()
            self.process.wait()
            self.port = free_port()
        raise RuntimeError("redis-server did not start")

    def _ready(self) -> bool:
        "Read its log until it accepts connections (or it exits)."
        for line in self.process.stdout:
            if "Ready to accept connections" in line:
                return True
        return False

    def client(self):
        import redis

        return redis.Redis(port=self.port, password=self.password, decode_responses=True)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
