"""The release as a user gets it: the wheel installed alone into a fresh virtualenv (no checkout
on the path), running the README's key-free demo, which must print exactly what the README
shows; then the same demo with the state in Redis (the Lua scripts come from the wheel).

    python .ci/wheel_demo.py dist/llm_loadbalancer-X-py3-none-any.whl

Needs llm-echo from the package index and, for the Redis half, redis-server on this machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def demo() -> tuple[str, str]:
    "The demo's commands and the output the README promises (its first two code blocks)."
    text = README.read_text(encoding="utf-8")
    section = text.split("## Try it without an API key", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)
    (kind, commands), (_, expected) = blocks[0], blocks[1]
    assert kind == "bash", f"the demo's first block is not bash: {kind!r}"
    return commands, expected


def run(commands: str, venv: Path, user: Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PYTHON"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["LLM_USER_PATH"] = str(user)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode:
        sys.exit(f"the demo failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main(wheel: str) -> None:
    commands, expected = demo()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"{Path(wheel).resolve()}[redis]", "llm-echo"], check=True)
        where = "import llm_loadbalancer; print(llm_loadbalancer.__file__)"
        found = subprocess.run(
            [str(venv / "bin" / "python"), "-c", where],
            cwd=work,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert str(venv) in found, f"not the installed wheel: {found}"
        got = run(commands, venv, work / "user-file", work)
        if got != expected:
            sys.exit(f"the installed wheel's demo printed:\n{got}\nthe README shows:\n{expected}")
        print("the installed wheel's demo printed the README's output")

        if shutil.which("redis-server") is None:
            sys.exit("redis-server is not installed: the Redis half of the demo cannot run")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            shared = re.sub(r"^(llm lb save .*)$", rf"\1 --state {url}", commands, flags=re.M)
            assert shared != commands, "the demo saves no balancer"
            user = work / "user-redis"
            got = run(shared, venv, user, work)
            if got != expected:
                sys.exit(f"with Redis state it printed:\n{got}\nthe README shows:\n{expected}")
            state = run("llm lb state demo", venv, user, work)
            assert url in state and not (user / "loadbalancers.db").exists(), state
            print(f"and the same with its state in Redis ({url})")
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1])
