"""Failover, cooldowns, the failover policy and `llm lb stats`, with the flaky test model
(issue 4). The same faults through llm's OpenAI plugin over HTTP are in test_http.py."""

import asyncio
import json
import time

import llm
import pytest
from conftest import end_cooldowns, save_lb
from fake_models import CALLS


@pytest.fixture
def save(fake_models):
    return save_lb


def ask(name="lb:x"):
    return llm.get_model(name).prompt("hi").text()


def stats(run_llm, name="x"):
    return json.loads(run_llm("lb", "stats", name, "--json").stdout)[0]["members"]


def test_failover_answers_the_prompt(save, run_llm):
    save("x", "flaky name=a fail=429", "flaky name=b")
    assert ask() == "answer from b"
    assert CALLS == ["a", "b"]
    a, b = stats(run_llm)
    assert (a["requests"], a["failures"], a["successes"]) == (1, 1, 0)
    assert a["last_error"].startswith("429 rate limited")
    assert (b["requests"], b["successes"]) == (1, 1)


def test_cooling_member_is_skipped_then_used_again(save):
    save("x", "flaky name=a fail=429:100", "flaky name=b", "flaky name=c")
    answers = [ask() for _ in range(4)]
    # a failed once; while it cools down the rotation passes it by
    assert answers == ["answer from b", "answer from b", "answer from c", "answer from b"]
    assert CALLS.count("a") == 1
    end_cooldowns()  # the 100 s of its Retry-After are over
    CALLS.clear()
    ask()  # position is at c
    ask()  # a again: its cooldown is over (it fails again, b answers)
    assert CALLS == ["c", "a", "b"]


@pytest.mark.parametrize(
    "fail,cooldown,reason",
    [
        ("503:120", 120, "503 service unavailable"),  # the error's Retry-After
        ("500", 7, "500 server error"),  # the balancer's cooldown
        ("429", 7, "429 rate limited"),
        ("refused", 7, "connection refused"),
        ("401", 600, "401 unauthorized"),  # a key problem: ten minutes
        ("403", 600, "403 forbidden"),
        ("missing-key", 600, "missing key"),
    ],
)
def test_cooldown_length(save, run_llm, fail, cooldown, reason):
    save("x", f"flaky name=a fail={fail}", "flaky name=b", flags=("--cooldown", "7"))
    before = time.time()
    assert ask() == "answer from b"
    until = stats(run_llm)[0]["cooling_down_until"]
    assert before + cooldown - 0.5 <= until <= time.time() + cooldown + 0.5
    text = run_llm("lb", "stats", "x").stdout
    assert "cooling down until" in text and f"last error: {reason}" in text


@pytest.mark.parametrize("fail", ["408", "409"])
def test_408_and_409_fail_over_without_cooldown(save, run_llm, fail):
    save("x", f"flaky name=a fail={fail}", "flaky name=b")
    assert ask() == "answer from b"
    assert stats(run_llm)[0]["cooling_down_until"] is None


def test_a_missing_key_fails_over_to_a_member_with_one(run_llm, user_path):
    (user_path / "keys.json").write_text(json.dumps({"work": "value-work"}))
    run_llm("lb", "save", "k", "echo-needs-key", "echo-needs-key key=work")
    result = run_llm("-m", "lb:k", "hi")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["key"] == "value-work"


def test_errors_every_member_would_give_are_not_failed_over(save, run_llm):
    save("x", "flaky name=a fail=400", "flaky name=b")
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: lb:x: member 1 (flaky, name=a, fail=400): Error code: 400 - simulated failure"
    )
    assert CALLS == ["a"]
    assert stats(run_llm)[0]["cooling_down_until"] is None


def test_an_error_after_the_first_chunk_is_not_retried(save, run_llm):
    save("x", "flaky name=a fail=cut", "flaky name=b")
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1
    assert result.stdout.count("first chunk from a") == 1
    assert "answer from b" not in result.stdout
    assert CALLS == ["a"]


def test_all_members_failing_lists_each_one(save, run_llm):
    save("x", "flaky name=a fail=429", "flaky name=b fail=refused", "flaky name=c fail=500")
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: lb:x: all 3 members failed: flaky (name=a, fail=429): 429 rate limited; "
        "flaky (name=b, fail=refused): connection refused; "
        "flaky (name=c, fail=500): 500 server error"
    )
    assert sorted(CALLS) == ["a", "b", "c"]


def test_members_cooling_down_are_named_as_skipped(save, run_llm):
    save("x", "flaky name=a fail=429", "flaky name=b fail=500", "flaky name=c fail=401")
    run_llm("-m", "lb:x", "hi")
    CALLS.clear()
    # everyone is cooling down now: all are still tried, the soonest cooldown first
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1
    assert CALLS == ["a", "b", "c"]  # a and b cool 30 s (a first: it failed first), c 600 s
    assert "all 3 members failed" in result.stderr


def test_no_failover_shows_the_members_error(save, run_llm):
    save("x", "flaky name=a fail=429", "flaky name=b", flags=("--no-failover",))
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: lb:x: member 1 (flaky, name=a, fail=429): Error code: 429 - simulated failure"
    )
    assert CALLS == ["a"]


def test_failover_policy_returns_to_the_primary(save):
    save(
        "x",
        "flaky name=a fail=429:100",
        "flaky name=b",
        "flaky name=c",
        flags=("--policy", "failover"),
    )
    assert [ask() for _ in range(3)] == ["answer from b"] * 3
    assert CALLS == ["a", "b", "b", "b"]
    end_cooldowns()  # the primary's cooldown is over: it is tried first again
    CALLS.clear()
    assert ask() == "answer from b"  # a was tried first again, failed again
    assert CALLS == ["a", "b"]


def test_reset_clears_cooldowns_and_stats(save, run_llm):
    save("x", "flaky name=a fail=429", "flaky name=b")
    ask()
    assert run_llm("lb", "reset", "x").exit_code == 0
    assert all(m["requests"] == 0 and m["cooling_down_until"] is None for m in stats(run_llm))
    CALLS.clear()
    ask()
    assert CALLS == ["a", "b"]


def test_stats_add_up(save, run_llm):
    save("x", "flaky name=a", "flaky name=b fail=500:0", "flaky name=c")
    for _ in range(9):
        ask()
    members = stats(run_llm)
    assert sum(m["successes"] for m in members) == 9
    assert sum(m["requests"] for m in members) == len(CALLS)
    assert sum(m["failures"] for m in members) == CALLS.count("b")
    assert sum(m["share"] for m in members) == pytest.approx(1.0)
    text = run_llm("lb", "stats").stdout
    assert text.startswith("lb:x\n  1. flaky (name=a)  █████··············· 25% of traffic\n")


def test_debug_line_on_failover(save, monkeypatch, capsys):
    monkeypatch.setenv("LLM_LOADBALANCER_DEBUG", "1")
    save("x", "flaky name=a fail=429", "flaky name=b")
    ask()
    err = capsys.readouterr().err
    assert (
        "llm-loadbalancer: lb:x: member 1 (flaky, name=a, fail=429) failed (429 rate limited), "
        "trying member 2 (flaky, name=b)" in err
    )


def test_a_key_in_an_error_never_reaches_stats(run_llm, user_path, fake_models):
    (user_path / "keys.json").write_text(json.dumps({"work": "sk-TOPSECRET-1"}))
    save_lb("x", "flaky name=a fail=leak key=work", "flaky name=b")
    result = run_llm("-m", "lb:x", "hi")
    assert result.exit_code == 1  # an error every member would give: shown as it is
    members = stats(run_llm)
    assert members[0]["last_error"] == "error: Illegal header value b'Bearer ***'"
    assert "TOPSECRET" not in run_llm("lb", "stats", "x").stdout
    assert "TOPSECRET" not in (user_path / "loadbalancers.db").read_bytes().decode("latin-1")


def test_async_failover(save):
    save("x", "flaky name=a fail=500", "flaky name=b")

    async def go():
        return await llm.get_async_model("lb:x").prompt("hi").text()

    assert asyncio.run(go()) == "answer from b"
    assert CALLS == ["a", "b"]
