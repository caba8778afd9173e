"""Shared state in a real Redis server (issue 12): several llm user folders ("machines") with
the same balancer and one redis-server on 127.0.0.1, through llm; and what is Redis's own:
machines, the server's clock, a process's last snapshot, falling back to this machine's file,
passwords and URLs. The rules of the state itself (rotation, limits, cooldowns, in flight,
ties, statistics) are the store contract, tested for Redis and the file alike in
test_store.py."""

import dataclasses
import json
import subprocess
import sys
import time

import llm
import pytest
from conftest import NOW, invoke, process_env, save_lb, set_keys
from fake_models import CALLS

from llm_loadbalancer import config, store
from llm_loadbalancer.store import Outcome

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
    assert stats[0]["cooling_down_for"] == "429 rate limited"


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
    assert redis_server.client().keys("llm-lb:*") == []


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
    save_lb(
        "skew", "echo rpm=1", "echo rpm=1", flags=("--state", redis_server.url, "--max-wait", "0")
    )
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


ON_ANOTHER_MACHINE = """
import dataclasses, json, sys
from llm_loadbalancer import config, store
name, data, user_dir, now = sys.argv[1:]
balancer = dataclasses.replace(config.from_dict(name, json.loads(data)), user_dir=user_dir)
shared = store.open_store(balancer, fallback=False)
shared.host = "machine-a"
print(shared.choose(balancer, now=float(now)).plan.order[0])
"""


def test_prompts_in_flight_on_another_machine_count_until_they_are_an_hour_old(
    redis_server, user_path
):
    balancer = shared(redis_server, user_path, "busy", policy="least-busy")
    # a process of machine A chooses member 1, and ends before the prompt does
    done = subprocess.run(
        [sys.executable, "-c", ON_ANOTHER_MACHINE, balancer.name]
        + [json.dumps(balancer.to_dict()), balancer.user_dir, repr(NOW)],
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "0\n"), done.stderr
    here = store.open_store(balancer, fallback=False)
    # its process cannot be looked up from this machine: the prompt counts
    seen = here.choose(balancer, now=NOW + 1)
    assert seen.plan.order[0] == 1 and seen.plan.why.endswith("(in flight by member: 1: 1, 2: 0)")
    here.record(balancer, 1, Outcome(), ticket=seen.ticket, now=NOW + 2)
    assert here.choose(balancer, now=NOW + 3).plan.why.endswith("(in flight by member: 1: 1, 2: 0)")
    # until it is an hour old
    assert here.choose(balancer, now=NOW + 3700).plan.why.endswith(
        "(in flight by member: 1: 0, 2: 0)"
    )
