import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from llm.cli import cli
from local_server import free_port

# The plugins that `llm` processes started by a test load (LLM_LOAD_PLUGINS), besides llm's own
# (its OpenAI plugin): what tests use, and a third of the start-up time of every installed
# plugin. The local_anthropic fixture adds llm-anthropic. This process loads every plugin.
LB_AND_ECHO = ("llm-loadbalancer", "llm-echo")

# The present time for tests that inject a clock (the pure decisions; the state's now=).
NOW = 1_000_000.0


@pytest.fixture(autouse=True)
def user_path(tmp_path, monkeypatch):
    """Every test gets its own llm directory; the user's real one is never touched. Processes
    it starts load only LB_AND_ECHO."""
    path = tmp_path / "llm-user"
    path.mkdir()
    monkeypatch.setenv("LLM_USER_PATH", str(path))
    monkeypatch.delenv("LLM_LOADBALANCER_DEBUG", raising=False)
    monkeypatch.delenv("LLM_RAISE_ERRORS", raising=False)
    monkeypatch.setenv("LLM_LOAD_PLUGINS", ",".join(LB_AND_ECHO))
    monkeypatch.delenv("LLM_LOADBALANCER_STATE", raising=False)
    monkeypatch.delenv("LLM_LOADBALANCER_STATE_KEY", raising=False)
    from llm_loadbalancer import store

    # what one process learns of its stores (state files, Redis servers, one found down,
    # warnings given) is each test's own, as it is each llm command's
    store.new_process()
    return path


@pytest.fixture(autouse=True)
def _fresh_debug_output():
    """LLM_LOADBALANCER_DEBUG's handler writes to the sys.stderr of the moment it was made (a
    CliRunner's, capsys's): each test that turns debug on gets its own."""
    yield
    import logging

    logger = logging.getLogger("llm_loadbalancer")
    handler = getattr(logger, "_lb_handler", None)
    if handler is not None:
        logger.removeHandler(handler)
        logger._lb_handler = None


def invoke(*args, input=None, env=None):
    "Run an llm command in this process, as a user would type it."
    runner = CliRunner()
    return runner.invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def save_lb(name, *members, flags=()):
    "llm lb save NAME MEMBER ... [FLAGS], which must succeed."
    result = invoke("lb", "save", name, *members, *flags)
    assert result.exit_code == 0, result.output


@pytest.fixture
def run_llm():
    return invoke


def use_editor(monkeypatch, tmp_path, script):
    """EDITOR runs the Python file ``script`` on the file it is asked to edit (its last
    argument); the edit's temporary files go to the test's folder (a refused edit is kept
    there). Quoted: click splits EDITOR as a POSIX shell would, and a Windows path has
    backslashes."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("EDITOR", f'"{sys.executable}" "{script}"')
    monkeypatch.delenv("VISUAL", raising=False)


ALL_PLUGINS = ("every installed plugin",)


def process_env(plugins=None, env=None) -> dict:
    """The environment of a new process: this one's, plus ``env``. ``plugins``: load only these
    besides llm's own; None: the test's (LB_AND_ECHO, and llm-anthropic with local_anthropic);
    ALL_PLUGINS: every installed plugin, as a user's llm does."""
    full_env = dict(os.environ)
    if plugins is ALL_PLUGINS:
        full_env.pop("LLM_LOAD_PLUGINS", None)
    elif plugins is not None:
        full_env["LLM_LOAD_PLUGINS"] = ",".join(plugins)
    full_env.update(env or {})
    return full_env


def llm_process(*args, input=None, env=None, timeout=60, plugins=None):
    "Run an llm command in a new process (every llm command is one); see process_env."
    return subprocess.run(
        [sys.executable, "-m", "llm", *args],
        input=input,
        capture_output=True,
        text=True,
        env=process_env(plugins, env),
        timeout=timeout,
    )


WORKER = """
import sys, llm
done = failed = 0
model = llm.get_model(sys.argv[1])
for _ in range(int(sys.argv[2])):
    try:
        model.prompt("hi", stream=False).text()
        done += 1
    except Exception as ex:
        assert "every member is at its limit" in str(ex), str(ex)
        failed += 1
print(done, failed)
"""


def run_workers(model_id, processes, prompts, envs=None):
    """``processes`` processes at once, each sending ``prompts`` prompts to ``model_id`` (with
    each environment of ``envs`` in turn): [(answered, refused at a limit)] per process."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, model_id, str(prompts)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(env=(envs or [None])[number % len(envs or [None])]),
        )
        for number in range(processes)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), results
    return [tuple(map(int, out.split())) for out, _ in results]


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


def end_cooldowns():
    "Time moves through the state file: every cooldown ends now."
    import sqlite3
    from contextlib import closing

    from llm_loadbalancer import store

    with closing(sqlite3.connect(store.file_of())) as db, db:
        db.execute("update cooldowns set until = 0")


def folder_snapshot(user_path):
    folder = user_path / "loadbalancers"
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def fake_models(monkeypatch):
    """Registers plain-sync (sync only, no streaming), sync-stream (sync only, streaming),
    strict (validated options) and flaky (fails as its options say) models."""
    monkeypatch.setenv("LB_TEST_FLAKY_KEY", "sk-flaky-default")
    from fake_models import CALLS, GATE, SYNC_EVENTS, FakeModelsPlugin
    from llm.plugins import load_plugins, pm

    CALLS.clear()
    SYNC_EVENTS.clear()
    GATE.clear()
    load_plugins()
    pm.register(FakeModelsPlugin(), name="lb-test-models")
    yield
    GATE.set()  # (a sync-stream member still waiting ends)
    pm.unregister(name="lb-test-models")


@pytest.fixture
def local_openai(user_path):
    """A local OpenAI-compatible server on 127.0.0.1, and llm's OpenAI plugin configured for
    it: local-a and local-b (same model name, endpoints a and b), local-dead (nothing listens).
    Keys: work, personal, and each model's default key."""
    import yaml
    from local_openai import LocalOpenAI

    server = LocalOpenAI().start()
    models = [
        {
            "model_id": f"local-{endpoint}",
            "model_name": "gpt-local",
            "api_base": server.api_base(endpoint),
            "api_key_name": f"local-{endpoint}",
            "supports_tools": True,
            "supports_schema": True,
        }
        for endpoint in ("a", "b")
    ]
    models.append(
        {
            "model_id": "local-dead",
            "model_name": "gpt-local",
            "api_base": f"http://127.0.0.1:{free_port()}/v1",
            "api_key_name": "local-dead",
        }
    )
    (user_path / "extra-openai-models.yaml").write_text(yaml.safe_dump(models))
    set_keys(
        user_path,
        work="sk-work",
        personal="sk-personal",
        **{"local-a": "sk-a", "local-b": "sk-b", "local-dead": "sk-dead"},
    )
    yield server
    server.stop()


@pytest.fixture
def local_anthropic(user_path, monkeypatch):
    """A local Anthropic Messages API server on 127.0.0.1 (tests/local_anthropic.py), and
    llm-anthropic pointed at it: ANTHROPIC_BASE_URL is its endpoint "anthropic" (set in the
    environment, so `llm` processes started by the test inherit it; they load llm-anthropic
    too). Keys: anthropic (the plugin's default key, sk-ant-default), ant-work (sk-ant-work),
    ant-personal (sk-ant-personal). Usable together with local_openai.

    Every llm-anthropic model goes to this server; a cheap one to use is claude-haiku-4.5
    (anthropic/claude-haiku-4-5-20251001). Its thinking option (-o thinking 1) is sent as
    {"type": "enabled", "budget_tokens": 1024}; it has no thinking_effort, and this version of
    llm-anthropic has no thinking_budget option at all. The thinking option exists on
    claude-3.7-sonnet and every Claude 4 and later model; thinking_effort on claude-opus-4.5
    and later (sent as {"type": "adaptive"} plus output_config.effort); thinking alone is
    adaptive from the 4.6 models on; the Claude 5 models think by default, some always.
    llm-anthropic always streams over HTTP, also for --no-stream."""
    from local_anthropic import LocalAnthropic

    server = LocalAnthropic().start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url("anthropic"))
    plugins = os.environ.get("LLM_LOAD_PLUGINS")
    if plugins is not None and "llm-anthropic" not in plugins.split(","):
        monkeypatch.setenv("LLM_LOAD_PLUGINS", f"{plugins},llm-anthropic")
    set_keys(
        user_path,
        anthropic="sk-ant-default",
        **{"ant-work": "sk-ant-work", "ant-personal": "sk-ant-personal"},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_module_server():
    from redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(redis_module_server):
    "A real redis-server on 127.0.0.1, emptied for each test (one per test module)."
    redis_module_server.client().flushall()
    return redis_module_server
