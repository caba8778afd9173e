import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from llm.cli import cli


@pytest.fixture(autouse=True)
def user_path(tmp_path, monkeypatch):
    "Every test gets its own llm directory; the user's real one is never touched."
    path = tmp_path / "llm-user"
    path.mkdir()
    monkeypatch.setenv("LLM_USER_PATH", str(path))
    monkeypatch.delenv("LLM_LOADBALANCER_DEBUG", raising=False)
    monkeypatch.delenv("LLM_RAISE_ERRORS", raising=False)
    return path


def invoke(*args, input=None, env=None):
    "Run an llm command in this process, as a user would type it."
    runner = CliRunner()
    return runner.invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


@pytest.fixture
def run_llm():
    return invoke


def llm_process(*args, input=None, env=None, timeout=60):
    "Run an llm command in a new process (every llm command is one)."
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        input=input,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture
def llm_proc():
    return llm_process


def set_keys(user_path, **keys):
    path = user_path / "keys.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(keys)
    path.write_text(json.dumps(data))


def last_logged(n=1):
    "The last n logged responses, as 'llm logs --json' shows them (oldest first)."
    result = invoke("logs", "--json", "-n", str(n))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def folder_snapshot(user_path):
    folder = user_path / "loadbalancers"
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def fake_models():
    """Registers plain-sync (sync only, no streaming), strict (validated options) and flaky
    (fails as its options say) models."""
    from llm.plugins import load_plugins, pm

    from fake_models import CALLS, FakeModelsPlugin

    CALLS.clear()
    load_plugins()
    pm.register(FakeModelsPlugin(), name="lb-test-models")
    yield
    pm.unregister(name="lb-test-models")
