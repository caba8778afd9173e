"""``llm lb route NAME`` (issue 22, part 3): which member the next prompt would go to and why,
and where each member stands, without sending anything or changing the state; the next real
prompt then goes where it said. In the file and in Redis (the store's ``route``)."""

import json
import re

import pytest
from conftest import invoke, save_lb, set_keys

from llm_loadbalancer import config, store
from llm_loadbalancer.store import Outcome


@pytest.fixture(params=["file", "redis"])
def flags(request, user_path):
    # (a limit belongs to the model and key: each member here has a key of its own)
    set_keys(user_path, k1="one", k2="two", k3="three")
    if request.param == "file":
        return ()
    return ("--state", request.getfixturevalue("redis_server").url)


def route(name):
    result = invoke("lb", "route", name)
    assert result.exit_code == 0, result.output
    return result.stdout


def requests(name):
    members = json.loads(invoke("lb", "stats", name, "--json").stdout)[0]["members"]
    return [member["requests"] for member in members]


def answered_by(name):
    "Which member answered a real prompt (echo says nothing of it: the statistics do)."
    before = requests(name)
    assert invoke("-m", f"lb:{name}", "hi").exit_code == 0
    return [i + 1 for i, (a, b) in enumerate(zip(before, requests(name))) if b > a]


def test_route_names_the_next_member_changes_nothing_and_is_right(flags):
    save_lb("r", "echo key=k1", "echo key=k2 weight=2", "echo key=k3 tier=2", flags=flags)
    first = route("r")
    assert first.splitlines()[0] == (
        "lb:r: next: member 2 (echo, key: k2, weight=2), tier 1, by rotation"  # the heavier
    )
    assert "  3. echo (key: k3, tier=2)  tier 2  available" in first
    assert route("r") == first  # nothing moved
    for _ in range(3):  # each time, the next real prompt goes where route said
        named = int(re.match(r"lb:r: next: member (\d)", route("r")).group(1))
        assert answered_by("r") == [named]


def test_route_shows_limits_cooldowns_and_when_each_frees_up(flags):
    save_lb("s", "echo key=k1 rpm=1", "echo key=k2", flags=flags)
    assert answered_by("s") == [1]
    balancer = config.load("s")
    st = store.open_store(balancer, fallback=False)
    st.record(balancer, 1, Outcome(error="500 server error: boom", cooldown=30.0))
    shown = route("s")
    lines = shown.splitlines()
    assert re.fullmatch(
        r"  1\. echo \(key: k1, rpm=1\)  tier 1  at its limit \(rpm 1/1\), free again at .+",
        lines[1],
    ), lines[1]
    assert re.fullmatch(
        r"  2\. echo \(key: k2\)  tier 1  cooling down until .+ \(500 server error\)", lines[2]
    ), lines[2]
    # a guessed cooldown is still tried when nothing else is left
    assert lines[0] == "lb:s: next: member 2 (echo, key: k2), tier 1, by rotation"
    data = json.loads(invoke("lb", "route", "s", "--json").stdout)
    assert [m["state"] for m in data["members"]] == ["at its limit", "cooling down"]
    assert data["members"][0]["limits"] == {"rpm": {"used": 1, "limit": 1}}
    assert data["next"] == {"member": 2, "tier": 1, "why": "rotation"}


def test_route_says_when_no_member_may_be_asked(user_path):
    set_keys(user_path, k1="one", k2="two")
    save_lb("w", "echo key=k1 rpm=1", "echo key=k2 rpm=1")
    assert invoke("-m", "lb:w", "hi").exit_code == 0
    assert invoke("-m", "lb:w", "hi").exit_code == 0
    first = route("w").splitlines()[0]
    assert re.fullmatch(
        r"lb:w: next: none now: every member is at its limit or inside a reset its provider "
        r"stated; the first to free up is member 1 \(echo, key: k1, rpm=1\), at .+",
        first,
    ), first


def test_route_of_an_unknown_balancer_is_a_one_line_error(user_path):
    result = invoke("lb", "route", "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1


def test_route_shows_a_member_being_probed(flags):
    save_lb("p", "echo key=k1", "echo key=k2", flags=("--policy", "failover", *flags))
    balancer = config.load("p")
    st = store.open_store(balancer, fallback=False)
    now = __import__("time").time()
    st.record(balancer, 0, Outcome(error="500 server error: boom", cooldown=30.0), now=now - 31)
    store.new_process()  # another process's prompt: the cooldown has ended, it probes
    probe = store.open_store(balancer, fallback=False).choose(balancer)
    assert probe.ticket.probe
    lines = route("p").splitlines()
    assert lines[0] == "lb:p: next: member 2 (echo, key: k2), tier 1, by the first listed"
    assert re.fullmatch(
        r"  1\. echo \(key: k1\)  tier 1  being probed after its cooldown, until .+ at the "
        r"latest",
        lines[1],
    ), lines[1]


def test_route_with_a_prompt_counts_its_tokens_and_its_prefix(flags, tmp_path, monkeypatch):
    save_lb("a", "echo key=k1", "echo key=k2", flags=("--affinity", "300", *flags))
    long = "You answer from the manual. " * 200
    manual = tmp_path / "manual.txt"
    manual.write_text(long)
    assert invoke("-m", "lb:a", "-f", str(manual), "first").exit_code == 0  # member 1: its home
    shown = invoke("lb", "route", "a", "-f", str(manual), "second question")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert re.fullmatch(
        r"lb:a: next: member 1 \(echo, key: k1\), tier 1, by affinity \(prefix [0-9a-f]{4}…, "
        r"\d+ s ago\)",
        lines[0],
    ), lines[0]
    # 5,600 bytes of fragment, a line break and 15 of text at 3 bytes a token, 4 for the message
    expected = r"  the prompt: about 1,876 tokens of input; its prefix [0-9a-f]{4}…"
    assert re.fullmatch(expected, lines[1]), lines[1]
    plain = route("a").splitlines()[0]  # without the prompt: the rotation's turn
    assert plain == "lb:a: next: member 2 (echo, key: k2), tier 1, by rotation"
    monkeypatch.chdir(tmp_path)  # (a relative name: llm reads "C:" of a Windows path as a loader)
    missing = invoke("lb", "route", "a", "-f", "nope.txt", "q")
    assert missing.exit_code == 1 and "not found" in missing.stderr


def test_route_with_a_prompt_in_a_fresh_llm_folder(user_path):
    save_lb("fresh", "echo", "echo")
    result = invoke("lb", "route", "fresh", "-s", "be brief", "hello")
    assert result.exit_code == 0, result.output
    assert "the prompt: about" in result.stdout
