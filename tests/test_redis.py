"""Shared state in a real Redis server (issue 12): several llm user folders ("machines") with
the same balancer and one redis-server on 127.0.0.1, through llm; and what is Redis's own:
machines, the server's clock, a process's last snapshot, falling back to this machine's file,
passwords and URLs. The rules of the state itself (rotation, limits, cooldowns, in flight,
ties, statistics) are the store contract, tested for Redis and the file alike in
test_store.py."""

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time

import llm
import pytest
from conftest import invoke, process_env, save_lb, set_keys
from fake_models import CALLS

from llm_loadbalancer import config, store
from llm_loadbalancer.store import Outcome
from llm_loadbalancer.store.redis import RedisStore

PASSWORD = "s3cret-redis-password"


@pytest.fixture
def machines(tmp_path, monkeypatch, redis_server):
    """Two llm user folders, A and B; ``use(name)`` makes one the folder of this process, as
    it would be on that machine."""
    folders = {}
    for name in ("A", "B"):
        folders[name] = tmp_path / f"machine-{name}"
        folders[name].mkdir()

    def use(name):
        monkeypatch.setenv("LLM_USER_PATH", str(folders[name]))
        return folders[name]

    use.folders = folders
    return use


def on_both(machines, name, *members, flags=()):
    "The same balancer saved on both machines."
    for machine in ("A", "B"):
        machines(machine)
        save_lb(name, *members, flags=flags)


def members_stats(name):
    result = invoke("lb", "stats", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]["members"]


def ask(name):
    return llm.get_model(f"lb:{name}").prompt("hi").text()


def shared(redis_server, user_path, name, **data):
    "A balancer of two echo members (unless given) whose state is in the server."
    data = {"members": [{"model": "echo"}] * 2, **data, "state": redis_server.url}
    return dataclasses.replace(config.from_dict(name, data), user_dir=str(user_path))


def test_the_rotation_continues_from_one_machine_to_the_other(machines, redis_server, fake_models):
    flags = ("--state", redis_server.url)
    on_both(machines, "team", "flaky name=a", "flaky name=b", "flaky name=c", flags=flags)
    answers = []
    for machine in "ABABAB":
        machines(machine)
        answers.append(ask("team"))
    assert answers == [f"answer from {n}" for n in "abcabc"]
    # statistics are the server's: both machines see all six prompts
    for machine in "AB":
        machines(machine)
        assert [m["successes"] for m in members_stats("team")] == [2, 2, 2]
    # and the machines' own state files were never used
    assert not (machines.folders["A"] / "loadbalancers.db").exists()


def test_a_cooldown_set_on_one_machine_is_seen_on_the_other(machines, redis_server, fake_models):
    flags = ("--state", redis_server.url)
    on_both(machines, "x", "flaky name=a fail=429:100", "flaky name=b", flags=flags)
    machines("A")
    assert ask("x") == "answer from b"  # a failed: 100 s of Retry-After
    machines("B")
    CALLS.clear()
    assert [ask("x") for _ in range(3)] == ["answer from b"] * 3
    assert CALLS == ["b"] * 3  # B never asked a
    stats = members_stats("x")
    assert stats[0]["cooling_down_for"] == (
        "429 rate limited, reset in 1m40s stated by the provider in retry-after"
    )


@pytest.mark.parametrize("policy", ["failover", "least-busy", "lowest-latency", "random"])
def test_every_policy_chooses_through_the_server(machines, redis_server, policy, caplog):
    on_both(machines, "p", "echo", "echo", flags=("--state", redis_server.url, "--policy", policy))
    for machine in "ABAB":
        machines(machine)
        result = invoke("-m", "lb:p", "hi", env={"LLM_LOADBALANCER_DEBUG": "1"})
        assert result.exit_code == 0, result.output
    assert len([m for m in caplog.messages if "chosen:" in m]) == 4
    assert sum(m["successes"] for m in members_stats("p")) == 4
    if policy == "failover":
        assert [m["successes"] for m in members_stats("p")] == [4, 0]


def test_different_definitions_of_one_name_never_mix(machines, redis_server):
    machines("A")
    save_lb("team", "echo", "echo", flags=("--state", redis_server.url))
    machines("B")
    save_lb("team", "echo", "echo", "echo", flags=("--state", redis_server.url))
    for machine in "ABAB":
        machines(machine)
        ask("team")
    machines("A")
    assert [m["requests"] for m in members_stats("team")] == [1, 1]
    assert invoke("lb", "reset", "team").exit_code == 0
    assert [m["requests"] for m in members_stats("team")] == [0, 0]
    machines("B")  # A's reset is not B's: B's balancer has other members
    assert [m["requests"] for m in members_stats("team")] == [1, 1, 0]


def test_reset_and_remove_are_for_every_machine(machines, redis_server):
    on_both(machines, "r", "echo", "echo", flags=("--state", redis_server.url))
    machines("A")
    ask("r")
    machines("B")
    assert invoke("lb", "reset", "r").exit_code == 0
    machines("A")
    assert [m["requests"] for m in members_stats("r")] == [0, 0]
    ask("r")
    assert invoke("lb", "remove", "r").exit_code == 0
    # what is left is the server's, not the balancer's: the format of the keys, the last ticket
    assert set(redis_server.client().keys("llm-lb:*")) <= {"llm-lb:2:ids", "llm-lb:format"}


def test_redis_stopped_mid_run_answers_from_the_local_file(user_path, redis_server):
    save_lb("down", "echo", "echo", flags=("--state", redis_server.url))
    assert invoke("-m", "lb:down", "one").exit_code == 0
    redis_server.stop()
    try:
        results = [invoke("-m", "lb:down", text) for text in ("two", "three")]
        assert [r.exit_code for r in results] == [0, 0]
        assert '"prompt": "two"' in results[0].stdout
        warning = results[0].stderr
        assert warning.startswith("Warning: lb:down: cannot use its Redis state (")
        assert "Connection refused" in warning and len(warning.splitlines()) == 1
        assert results[1].stderr == ""  # one warning per process
        assert (user_path / "loadbalancers.db").exists()
        # a new llm process tries the server again, warns, and answers
        proc = subprocess.run(
            [sys.executable, "-m", "llm", "-m", "lb:down", "four", "--no-log"],
            capture_output=True,
            text=True,
            env=process_env(),
            timeout=60,
        )
        assert proc.returncode == 0 and '"prompt": "four"' in proc.stdout
        assert "Traceback" not in proc.stderr and "cannot use its Redis state" in proc.stderr
        assert invoke("lb", "state", "down").exit_code == 1
    finally:
        redis_server.start()
    # once it is back, the next process uses it again (this server keeps nothing on disk, so
    # it starts afresh: one request, this one)
    store.new_process()
    assert invoke("-m", "lb:down", "five").stderr == ""
    assert [m["requests"] for m in members_stats("down")] == [1, 0]


def test_a_request_the_file_counted_while_the_server_was_down_ends_in_the_file(
    user_path, redis_server, capsys, monkeypatch
):
    save_lb("back", "echo rpm=100", "echo", flags=("--state", redis_server.url))
    balancer = config.load("back")
    prompts = store.open_store(balancer)
    redis_server.stop()
    try:
        choice = prompts.choose(balancer)  # the file chooses, and counts the request
    finally:
        redis_server.start()
    assert "cannot use its Redis state" in capsys.readouterr().err
    # TRY_AGAIN seconds later the server is tried again, while the prompt still runs
    later = time.monotonic() + store.TRY_AGAIN
    monkeypatch.setattr(store, "clock", lambda: later)
    member = choice.plan.order[0]
    prompts.record(balancer, member, Outcome(tokens_in=2, tokens_out=3), ticket=choice.ticket)
    here = dataclasses.replace(balancer, state="local")
    assert store.open_store(here).stats(here)[member]["input_tokens"] == 2
    assert store.open_store(balancer, fallback=False).stats(balancer)[member]["requests"] == 0
    # the server is back and was not found down again: the next choice is stored there
    prompts.choose(balancer)
    assert capsys.readouterr().err == ""
    assert redis_server.client().keys("llm-lb:*")


def test_a_server_that_never_answers_is_left_after_its_timeout_and_the_prompt_answered(
    user_path,
):
    import socket

    with socket.socket() as silent:  # accepts connections, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        save_lb("mute", "echo", "echo", flags=("--state", url))
        result = invoke("-m", "lb:mute", "hi")
    assert result.exit_code == 0 and '"prompt": "hi"' in result.stdout
    assert "cannot use its Redis state" in result.stderr and "Timeout" in result.stderr


def test_the_password_comes_from_a_stored_key_and_is_never_shown(user_path):
    from redis_server import RedisServer

    server = RedisServer(password=PASSWORD).start()
    try:
        set_keys(user_path, redispw=PASSWORD)
        save_lb("pw", "echo", "echo", flags=("--state", server.url, "--state-key", "redispw"))
        outputs = [invoke("-m", "lb:pw", "hi")]
        for command in (
            ("lb", "list"),
            ("lb", "show", "pw"),
            ("lb", "stats"),
            ("lb", "state", "pw"),
        ):
            outputs.append(invoke(*command))
        assert all(r.exit_code == 0 for r in outputs), [r.output for r in outputs]
        assert "password from key redispw" in outputs[-1].stdout
        assert server.client().keys("llm-lb:*")  # the state is in the server
        set_keys(user_path, redispw="wrong")  # a wrong password: warned, answered locally
        store.new_process()  # (a new llm command)
        outputs.append(invoke("-m", "lb:pw", "hi"))
        assert outputs[-1].exit_code == 0 and "cannot use its Redis state" in outputs[-1].stderr
        for result in outputs:
            assert PASSWORD not in result.output and "wrong" not in result.stderr
        assert PASSWORD not in (user_path / "loadbalancers" / "pw.yaml").read_text()
    finally:
        server.stop()


def test_a_url_with_a_password_is_refused_everywhere(user_path, redis_server):
    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    result = invoke("lb", "save", "x", "echo", "echo", "--state", url)
    assert result.exit_code == 1
    assert "a password in the URL is refused" in result.output
    assert PASSWORD not in result.output and "llm keys set" in result.output
    # in a file
    (user_path / "loadbalancers").mkdir(exist_ok=True)
    (user_path / "loadbalancers" / "y.yaml").write_text(
        f"state: {url}\nmembers:\n- model: echo\n- model: echo\n"
    )
    listed = invoke("lb", "list")
    assert "a password in the URL is refused" in listed.output and PASSWORD not in listed.output
    prompt = invoke("-m", "lb:y", "hi")
    assert prompt.exit_code == 1 and PASSWORD not in prompt.output
    # in the environment: warned, and the prompt answered from the local file
    save_lb("z", "echo", "echo")
    result = invoke("-m", "lb:z", "hi", env={"LLM_LOADBALANCER_STATE": url})
    assert result.exit_code == 0
    assert "LLM_LOADBALANCER_STATE" in result.stderr and "refused" in result.stderr
    assert PASSWORD not in result.output


def test_the_environment_variable_names_the_server_for_every_balancer(user_path, redis_server):
    save_lb("e", "echo", "echo")
    env = {"LLM_LOADBALANCER_STATE": redis_server.url}
    assert invoke("-m", "lb:e", "hi", env=env).exit_code == 0
    listed = invoke("lb", "list", env=env).stdout
    assert f"state: Redis at {redis_server.url} (from LLM_LOADBALANCER_STATE)" in listed
    assert redis_server.client().keys("llm-lb:*")
    # state: local in the file keeps a balancer on this machine
    save_lb("here", "echo", "echo", flags=("--state", "local"))
    before = set(redis_server.client().keys("llm-lb:*"))
    assert invoke("-m", "lb:here", "hi", env=env).exit_code == 0
    assert set(redis_server.client().keys("llm-lb:*")) == before


def test_lb_state_reports_the_server_and_what_it_holds(user_path, redis_server):
    save_lb("s", "echo", "echo", flags=("--state", redis_server.url))
    save_lb("l", "echo", "echo")
    result = invoke("lb", "state", "s")
    assert result.exit_code == 0
    assert "nothing stored yet" in result.stdout and "reachable: Redis" in result.stdout
    ask("s")
    report = json.loads(invoke("lb", "state", "s", "--json").stdout)
    assert (report["known"], report["requests"], report["position"]) == (True, 1, 1)
    assert invoke("lb", "state", "l").stdout.startswith("lb:l: this machine's state file")
    stats = invoke("lb", "stats", "s").stdout
    assert stats.startswith(f"lb:s  (state: Redis at {redis_server.url})")


def test_a_sticky_conversation_keeps_its_member_while_other_machines_prompt(machines, redis_server):
    "Conversation ties are in the server; prompts from another machine move the rotation."
    flags = ("--state", redis_server.url, "--sticky")
    on_both(machines, "st", "echo", "echo", "echo", flags=flags)
    machines("A")
    conversation = llm.get_model("lb:st").conversation()
    conversation.prompt("one").text()  # member 1
    machines("B")
    ask("st")  # member 2; the rotation is at member 3 now
    machines("A")
    conversation.prompt("two").text()  # member 1 again, not member 3
    assert [m["requests"] for m in members_stats("st")] == [2, 1, 0]


def test_redis_py_is_not_imported_by_llm_when_no_balancer_uses_it(user_path):
    save_lb("plain", "echo", "echo")
    code = "import sys, llm; llm.get_model('lb:plain').prompt('hi').text(); print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=process_env(), timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr


def test_selections_keep_the_servers_clock_not_the_machines(user_path, redis_server, monkeypatch):
    set_keys(user_path, a="key-a", b="key-b")  # (each member its own provider's bucket)
    flags = ("--state", redis_server.url, "--max-wait", "0")
    save_lb("skew", "echo key=a rpm=1", "echo key=b rpm=1", flags=flags)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 120)  # this machine is 2 minutes behind
    assert [invoke("-m", "lb:skew", "hi").exit_code for _ in range(3)] == [0, 0, 1]
    assert [m["limits"]["rpm"]["used"] for m in members_stats("skew")] == [1, 1]


def test_a_state_key_that_is_not_stored_is_never_repeated(user_path, redis_server):
    (user_path / "loadbalancers").mkdir()
    (user_path / "loadbalancers" / "k.yaml").write_text(
        f"state: {redis_server.url}\nstate_key: {PASSWORD}\nmembers:\n- model: echo\n- model: echo\n"
    )
    results = [invoke("-m", "lb:k", "hi")]
    results += [invoke(*c) for c in (("lb", "list"), ("lb", "list", "--json"), ("lb", "show", "k"))]
    results += [invoke("lb", "stats"), invoke("lb", "state", "k")]
    assert results[0].exit_code == 0 and "its state_key is not the name of a stored key" in (
        results[0].stderr
    )
    assert "(not a stored key name)" in results[3].stdout
    for result in results:
        assert PASSWORD not in result.output


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pa/ss@host:6379/0",  # a password holding / or @
        f"redis://:{PASSWORD}@host",
        f"redis://host/0?pass%77ord={PASSWORD}",
        "redis://host/0?socket_connect_timeout=30",  # options would override the timeouts
    ],
)
def test_urls_with_passwords_or_options_are_refused_without_showing_them(user_path, url):
    result = invoke("lb", "save", "x", "echo", "echo", "--state", url)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    for secret in (PASSWORD, "pa/ss", "ss@host"):
        assert secret not in result.output


def test_stats_of_every_balancer_go_on_past_one_whose_server_is_down(user_path):
    save_lb("gone", "echo", "echo", flags=("--state", "redis://127.0.0.1:9/0"))
    save_lb("here", "echo", "echo")
    result = invoke("lb", "stats")
    assert result.exit_code == 0
    assert "lb:gone  error: cannot read statistics of lb:gone" in result.stdout
    assert "lb:here\n  1. echo" in result.stdout


def test_a_process_chooses_from_its_last_snapshot_in_one_round_trip(redis_server, user_path):
    "After its first prompt a process needs no separate read: the store is the round trip."
    balancer = shared(redis_server, user_path, "one", members=[{"model": "echo"}] * 3)
    mine = store.open_store(balancer, fallback=False)
    store.new_process()
    other = store.open_store(balancer, fallback=False)  # another process's
    reads = []
    read = mine.read
    mine.read = lambda **kwargs: reads.append(1) or read(**kwargs)

    def prompt(shared_store):
        choice = shared_store.choose(balancer)
        shared_store.record(balancer, choice.plan.order[0], Outcome(), ticket=choice.ticket)
        return choice.plan.order[0]

    firsts = [prompt(mine)]  # the first needs a read
    firsts += [prompt(mine), prompt(other), prompt(mine), prompt(mine)]
    # another process's prompt made this one's snapshot old: its store was refused, with the
    # fresh snapshot, from which it chose again; no read was needed after the first
    assert firsts == [0, 1, 2, 0, 1]
    assert reads == [1]


# --- whatever the server holds, a prompt is answered -----------------------------------------

MALFORMED = {
    "a rotation that is not a number": ("roundrobin", "hset", "rotation", ("position", "abc")),
    "a cooldown that is not one": ("roundrobin", "hset", "cooldowns", ("0", "garbage")),
    "a prompt in flight of 5 fields": ("least-busy", "hset", "flight", ("7", "0|a|b|c|d")),
    "a timing that is not numbers": ("lowest-latency", "lpush", "timings:0", ("a|b|c|d",)),
    "a timing of 5 fields": ("lowest-latency", "lpush", "timings:1", ("1|2|3|4|5",)),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_value_in_the_server_falls_back_to_the_file_with_one_warning(
    user_path, redis_server, what
):
    policy, command, key, args = MALFORMED[what]
    save_lb("bad", "echo", "echo", flags=("--state", redis_server.url, "--policy", policy))
    prefix = RedisStore.prefix(config.load("bad"))
    getattr(redis_server.client(), command)(prefix + key, *args)
    results = [invoke("-m", "lb:bad", text) for text in ("one", "two")]
    assert [r.exit_code for r in results] == [0, 0], results[0].output
    warning = results[0].stderr
    assert len(warning.splitlines()) == 1, warning
    assert warning.startswith("Warning: lb:bad: cannot use its Redis state (")
    assert "unexpected data for lb:bad" in warning and "'llm lb reset bad' clears it" in warning
    assert results[1].stderr == ""  # one warning per process
    # llm lb reset clears it, and the next process uses the server again
    assert invoke("lb", "reset", "bad").exit_code == 0
    store.new_process()
    assert invoke("-m", "lb:bad", "three").stderr == ""


def test_a_malformed_limit_declared_for_a_key_falls_back_with_one_warning(user_path, redis_server):
    set_keys(user_path, work="sk-work")
    save_lb("decl", "echo key=work rpm=5", "echo", flags=("--state", redis_server.url))
    member = config.load("decl").members[0]
    redis_server.client().hset(RedisStore.bucket(member) + "limits", "someone#0", "x|y")
    result = invoke("-m", "lb:decl", "one")
    assert result.exit_code == 0 and "unexpected data for lb:decl" in result.stderr
    # a key's entries are shared by every balancer, and kept by llm lb reset: the warning says
    assert f"delete the keys {RedisStore.bucket(member)}*" in result.stderr


def test_a_server_of_a_newer_format_is_left_for_the_file_with_a_warning_to_upgrade(
    user_path, redis_server
):
    save_lb("newer", "echo", "echo", flags=("--state", redis_server.url))
    redis_server.client().set("llm-lb:format", 3)  # written by a later llm-loadbalancer
    result = invoke("-m", "lb:newer", "one")
    assert result.exit_code == 0
    assert "in a newer format" in result.stderr
    assert "upgrade llm-loadbalancer on this machine" in result.stderr


class AnswersOK:
    "A server that answers +OK to every command: not Redis, though it speaks its protocol."

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            connection, _ = self.listener.accept()
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection):
        buffer = b""
        with connection:
            while data := connection.recv(65536):
                buffer += data
                while (end := _command_end(buffer)) is not None:
                    buffer = buffer[end:]
                    connection.sendall(b"+OK\r\n")


def _command_end(buffer: bytes):
    "Where the first whole command (a RESP array of bulk strings) of the buffer ends, or None."
    if not buffer.startswith(b"*") or b"\r\n" not in buffer:
        return None
    head, _, rest = buffer.partition(b"\r\n")
    at = len(head) + 2
    for _ in range(int(head[1:])):
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(buffer[at + 1 : line_end])
        at = line_end + 2 + size + 2
        if at > len(buffer):
            return None
    return at


def test_a_server_answering_ok_to_everything_is_left_for_the_file(user_path):
    server = AnswersOK()
    save_lb("ok", "echo", "echo", flags=("--state", server.url))
    results = [invoke("-m", "lb:ok", text) for text in ("one", "two")]
    assert [r.exit_code for r in results] == [0, 0], results[0].output
    assert "cannot use its Redis state" in results[0].stderr
    assert len(results[0].stderr.splitlines()) == 1 and results[1].stderr == ""
