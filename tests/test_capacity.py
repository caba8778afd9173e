"""Weights, per-member rate limits and quotas, waiting for a free member (issue 10).

The window arithmetic and the choices are pure functions, tested in test_policy.py (what an
exhausted quota looks like: test_failures.py). Here: what the state file counts, with an
injected clock, and what crosses processes, with several processes against the local
OpenAI-compatible server, which counts what reached each key."""

import json
import random
import re
import sqlite3
import time

import pytest
from conftest import NOW, invoke, run_workers, save_lb

from llm_loadbalancer import config, state

# --- through the state file, with an injected clock ------------------------------------------


def chosen(balancer, now):
    result, ticket, *_ = state.select(balancer, now=now)
    if ticket is not None:
        state.record(balancer, result.order[0], ticket=ticket, now=now)
    return result


def test_rpm_is_never_exceeded_and_the_member_is_used_again_when_its_window_has_room():
    save_lb("lim", "echo rpm=2", "echo example_bool=true rpm=1")
    balancer = config.load("lim")
    picks = [chosen(balancer, NOW + i).order[:1] for i in range(4)]
    assert picks == [(0,), (1,), (0,), ()]  # the fourth finds every member at its limit
    assert chosen(balancer, NOW + 3).wait == (NOW + 60, 0)  # a's first request ages out first
    assert chosen(balancer, NOW + 61).order[0] in (0, 1)


def test_token_limits_count_what_members_reported():
    save_lb("tok", "echo tpm=100", "echo example_bool=true")
    balancer = config.load("tok")
    result, ticket, *_ = state.select(balancer, now=NOW)
    state.record(balancer, 0, ticket=ticket, tokens=(70, 40), now=NOW)
    for step in range(1, 4):
        assert chosen(balancer, NOW + step).order[0] == 1  # 110 tokens: a has no room
    assert chosen(balancer, NOW + 61).order[:1] in ((0,), (1,))
    members = state.stats(balancer, now=NOW + 1)
    assert (members[0]["input_tokens"], members[0]["output_tokens"]) == (70, 40)
    assert members[0]["limits"] == {"tpm": {"used": 110, "limit": 100}}


def test_tokens_reported_after_the_clock_was_set_back_still_count():
    save_lb("back", "echo tpm=25", "echo example_bool=true")
    balancer = config.load("back")
    state.select(balancer, now=NOW)
    state.record(balancer, 0, tokens=(10, 0), now=NOW)
    state.record(balancer, 0, tokens=(20, 0), now=NOW - 30)  # the clock went back 30 s
    # 30 tokens in the minute: a has no room, whatever the rotation says
    assert [chosen(balancer, NOW + step).order[0] for step in (1, 2)] == [1, 1]
    assert state.stats(balancer, now=NOW + 1)[0]["limits"]["tpm"]["used"] == 30


def test_requests_sent_after_the_clock_was_set_back_still_count():
    save_lb("back", "echo rpm=3", "echo example_bool=true")
    balancer = config.load("back")
    sent = [chosen(balancer, NOW).order[0]]
    # the clock goes back 30 s, then moves on a second at a time
    sent += [chosen(balancer, NOW - 30 + step).order[0] for step in range(10)]
    assert sent.count(0) == 3  # never a 4th request in the minute
    assert state.stats(balancer, now=NOW - 20)[0]["limits"]["rpm"]["used"] == 3
    # two choices at one moment after the clock went back are numbered apart
    save_lb("same", "echo rpm=5", "echo example_bool=true", flags=("--policy", "failover"))
    same = config.load("same")
    for now in (NOW, NOW - 30, NOW - 30):
        assert state.select(same, now=now).plan.order[0] == 0
    assert state.stats(same, now=NOW - 30)[0]["limits"]["rpm"]["used"] == 3


def test_a_member_full_while_the_clock_ran_ahead_has_room_a_window_after_it_is_corrected():
    ahead = NOW + 5 * 3600  # the clock was 5 hours ahead for a few prompts, then corrected
    save_lb("ahead", "echo rpm=3", "echo example_bool=true", flags=("--policy", "failover"))
    balancer = config.load("ahead")
    assert [chosen(balancer, ahead + step).order[0] for step in range(3)] == [0, 0, 0]
    assert chosen(balancer, NOW + 1).order[0] == 1  # those 3 count from now ...
    assert chosen(balancer, NOW + 62).order[0] == 0  # ... for one minute, not five hours
    # tokens reported while it was ahead, the same
    save_lb("spent", "echo tpm=100", "echo example_bool=true", flags=("--policy", "failover"))
    spent = config.load("spent")
    state.record(spent, 0, ticket=state.select(spent, now=ahead).ticket, tokens=(100, 0), now=ahead)
    assert [chosen(spent, NOW + step).order[0] for step in (1, 62)] == [1, 0]
    # every member full: the wait is for one window, not for the hours the clock was ahead
    save_lb("full", "echo rpm=1", "echo example_bool=true rpm=1")
    full = config.load("full")
    assert [chosen(full, ahead).order[0] for _ in range(2)] == [0, 1]
    assert state.select(full, now=NOW + 120).plan.wait == (NOW + 180, 0)


def test_a_least_busy_request_dated_again_after_a_clock_step_still_ends():
    save_lb("busy", "echo", "echo example_bool=true", flags=("--policy", "least-busy"))
    balancer = config.load("busy")
    only_first = frozenset({1})  # both prompts go to member 1, the second after a step back
    first = state.select(balancer, now=NOW, unavailable=only_first)
    second = state.select(balancer, now=NOW - 30, unavailable=only_first)
    state.record(balancer, 0, ticket=first.ticket, now=NOW - 25)
    state.record(balancer, 0, ticket=second.ticket, now=NOW - 20)
    # neither is in flight any more: least-busy goes on in rotation
    assert [chosen(balancer, NOW - 10 + step).order[0] for step in range(4)] == [1, 0, 1, 0]


def test_a_member_that_fails_again_after_its_cooldown_cools_down_twice_as_long():
    save_lb("esc", "echo", "echo example_bool=true")
    balancer = config.load("esc")
    state.select(balancer, now=NOW)
    lengths = []
    now = NOW
    for _ in range(4):
        state.record(balancer, 0, error="500 server error: x", cooldown=30, now=now)
        until = state.stats(balancer, now=now)[0]["cooling_down_until"]
        lengths.append(until - now)
        now = until + 1  # it fails again right after its cooldown ended
    assert lengths == [30, 60, 120, 240]
    state.record(balancer, 0, now=now)  # a success resets it
    state.record(balancer, 0, error="500 server error: x", cooldown=30, now=now + 1)
    assert state.stats(balancer, now=now + 1)[0]["cooling_down_until"] == now + 31
    for _ in range(20):
        state.record(balancer, 0, error="500 server error: x", cooldown=30, now=now)
    assert state.stats(balancer, now=now)[0]["cooling_down_until"] == now + config.MAX_SECONDS


def test_a_balancer_defined_again_starts_without_the_old_definitions_cooldowns():
    save_lb("again", "echo", "echo example_bool=true")
    state.select(config.load("again"), now=NOW)
    state.record(config.load("again"), 1, error="500 server error: x", cooldown=300, now=NOW)
    save_lb("again", "echo", "echo example_bool=false", "echo", flags=("--force",))
    balancer = config.load("again")
    choice = state.select(balancer, now=NOW + 1)
    assert choice.plan.skipped == ()  # member 2 of this definition never failed
    assert choice.cooled == frozenset()
    assert [state.select(balancer, now=NOW + 1).plan.order[0] for _ in range(2)] == [1, 2]


# --- settings --------------------------------------------------------------------------------


def test_member_settings_on_the_command_line_and_in_the_file(user_path):
    from conftest import set_keys

    set_keys(user_path, k="value")
    save_lb("s", "echo weight=3 rpm=3 rpd=1500", "echo tpm=200000 tpd=1000000 key=k")
    data = config.load("s").to_dict()["members"]
    assert data[0] == {"model": "echo", "weight": 3, "rpm": 3, "rpd": 1500}
    assert data[1]["tpm"] == 200000 and data[1]["tpd"] == 1000000
    listed = invoke("lb", "list").stdout
    assert "echo (weight=3, rpm=3, rpd=1500)" in listed


def test_a_model_option_named_like_a_member_setting(fake_models, user_path):
    # options.NAME=value on the command line; `options:` in the file
    from conftest import set_keys

    set_keys(user_path, flaky="sk")
    save_lb("o", "flaky options.name=weight", "flaky name=b")
    assert config.load("o").members[0].options == {"name": "weight"}
    result = invoke("-m", "lb:o", "hi")
    assert result.stdout.strip() == "answer from weight"


@pytest.mark.parametrize("bad", ["weight=0", "rpm=-1", "tpm=1.5", "rpd=lots", "weight=true"])
def test_member_settings_are_whole_numbers(bad):
    result = invoke("lb", "save", "bad", f"echo {bad}", "echo")
    assert result.exit_code == 1
    assert "must be a whole number from 1 to 1,000,000,000" in result.stderr


def test_max_wait_and_quota_cooldown_are_saved(user_path):
    save_lb("m", "echo", "echo", flags=("--max-wait", "5", "--quota-cooldown", "7200"))
    balancer = config.load("m")
    assert (balancer.max_wait, balancer.quota_cooldown) == (5.0, 7200.0)


# --- through llm's OpenAI plugin and a local server, across processes ------------------------


def test_rpm_is_exact_across_eight_processes(local_openai):
    save_lb(
        "rpm",
        *[f"local-a key={key} rpm=3" for key in ("work", "personal")],
        *[f"local-b key={key} rpm=3" for key in ("work", "personal")],
        flags=("--max-wait", "0"),
    )
    counts = run_workers("lb:rpm", 8, 20)
    assert sum(done for done, _ in counts) == 12  # 4 members x 3, never a 4th
    seen = [f"{e}/{k}" for e, k in zip(local_openai.seen("endpoint"), local_openai.seen("key"))]
    assert sorted(seen) == sorted(["a/sk-work", "a/sk-personal", "b/sk-work", "b/sk-personal"] * 3)


def test_weighted_order_is_exact_across_processes(local_openai):
    save_lb("w", "local-a key=work weight=3", "local-a key=personal")
    counts = run_workers("lb:w", 4, 10)
    assert counts == [(10, 0)] * 4
    keys = local_openai.seen("key")
    assert (keys.count("sk-work"), keys.count("sk-personal")) == (30, 10)


def test_token_limit_from_the_usage_the_server_reports(local_openai):
    save_lb("t", "local-a key=work tpm=10", "local-a key=personal", flags=("--max-wait", "0"))
    for _ in range(4):
        assert invoke("-m", "lb:t", "--no-stream", "one two three").exit_code == 0
    # the first answer used 3 + 5 = 8 tokens (< 10: room), the third 8 more (16): no room
    assert local_openai.seen("key") == ["sk-work", "sk-personal", "sk-work", "sk-personal"]
    members = json.loads(invoke("lb", "stats", "t", "--json").stdout)[0]["members"]
    assert members[0]["limits"]["tpm"] == {"used": 16, "limit": 10}
    assert (members[0]["input_tokens"], members[0]["output_tokens"]) == (6, 10)


def age_requests(seconds):
    "Time moves through the state file: every request counted was sent ``seconds`` earlier."
    import sqlite3

    with sqlite3.connect(state.path()) as db:
        db.execute("update requests set at = at - ?", [seconds])


def test_waiting_for_a_member_says_so_and_then_sends(local_openai):
    save_lb("wait", "local-a key=work rpm=1", "local-a key=personal rpm=1")
    for _ in range(2):
        assert invoke("-m", "lb:wait", "hi").exit_code == 0
    age_requests(58)  # both free up about two seconds from now
    result = invoke("-m", "lb:wait", "hi")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"lb:wait: every member is at its limit; waiting [0-2] s for member 1 "
        r"\(local-a, key: work, rpm=1\)\n",
        result.stderr,
    )
    assert local_openai.seen("key") == ["sk-work", "sk-personal", "sk-work"]


def test_a_wait_longer_than_max_wait_fails_at_once(local_openai):
    save_lb("busy", "local-a key=work rpm=1", "local-a key=personal rpm=1")
    for _ in range(2):
        invoke("-m", "lb:busy", "hi")
    result = invoke("-m", "lb:busy", "hi")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert re.fullmatch(
        r"Error: lb:busy: every member is at its limit or inside its provider's Retry-After; "
        r"the first to free up is member 1 \(local-a, key: work, rpm=1\), in (59|60) s, longer "
        r"than max_wait \(30 s; llm lb save --max-wait\)",
        line,
    ), line
    assert len(local_openai.requests) == 2  # nothing was sent, nothing counted


def test_retry_after_is_waited_for_not_asked_early(local_openai):
    save_lb("ra", "local-a key=work", "local-a key=personal", flags=("--max-wait", "0"))
    local_openai.fail("429:100")  # every key: Retry-After 100
    result = invoke("-m", "lb:ra", "hi")
    assert result.exit_code == 1
    assert len(local_openai.requests) == 2
    result = invoke("-m", "lb:ra", "hi")  # both are inside their Retry-After: none is asked
    assert "every member is at its limit or inside its provider's Retry-After" in result.stderr
    assert len(local_openai.requests) == 2


def test_statistics_still_add_up_once_requests_older_than_a_day_are_folded_into_totals():
    save_lb("f", "echo tpm=1000", "echo")
    balancer = config.load("f")
    state.select(balancer)  # the definition is on record
    two_days_ago = time.time() - 2 * 86400
    state.record(balancer, 0, tokens=(3, 4), now=two_days_ago)
    state.record(balancer, 0, error="429 rate limited: slow down", now=two_days_ago + 1)
    state.record(balancer, 1, tokens=(1, 1), now=two_days_ago)
    db = sqlite3.connect(state.path())
    old = "select count(*) from outcomes where member = 0 and at < ?"
    assert db.execute(old, [two_days_ago + 10]).fetchone()[0] == 2
    # one record in PRUNE_EVERY (drawn at random, seeded here) folds the member's old rows
    random.seed(5)
    for count in range(1, 50 * state.PRUNE_EVERY):
        state.record(balancer, 0, tokens=(1, 2))
        if db.execute(old, [two_days_ago + 10]).fetchone()[0] == 0:
            break
    else:
        pytest.fail("the old rows were never folded")
    assert count > 1
    folded = db.execute(
        "select requests, successes, failures, input_tokens, output_tokens, last_error "
        "from stats where balancer = 'f' and member = 0"
    ).fetchone()
    assert folded == (2, 1, 1, 3, 4, "429 rate limited: slow down")
    first, second = state.stats(balancer)
    assert (first["requests"], first["successes"], first["failures"]) == (2 + count, 1 + count, 1)
    assert (first["input_tokens"], first["output_tokens"]) == (3 + count, 4 + 2 * count)
    assert first["last_error"] == "429 rate limited: slow down"
    assert first["last_used"] > two_days_ago + 86400  # the latest request, not a folded one
    assert (second["requests"], second["input_tokens"]) == (1, 1)  # not folded: still counted
    assert first["share"] == pytest.approx((2 + count) / (3 + count))


def test_requests_chosen_at_the_same_time_are_counted_in_order():
    save_lb("same", "echo rpm=3", "echo", flags=("--policy", "failover"))
    balancer = config.load("same")
    firsts = [state.select(balancer, now=NOW).plan.order[0] for _ in range(5)]
    assert firsts == [0, 0, 0, 1, 1]  # never a 4th request in the minute


def test_last_used_and_last_error_are_those_of_the_request_that_ended_last():
    save_lb("ended", "echo rpm=100", "echo", flags=("--policy", "failover"))
    balancer = config.load("ended")
    long_one = state.select(balancer, now=NOW).ticket
    short_one = state.select(balancer, now=NOW + 1).ticket
    state.record(balancer, 0, ticket=short_one, error="500 server error: short", now=NOW + 2)
    state.record(balancer, 0, ticket=long_one, error="429 rate limited: long", now=NOW + 60)
    member = state.stats(balancer, now=NOW + 61)[0]
    assert (member["last_used"], member["last_error"]) == (NOW + 60, "429 rate limited: long")


def test_a_prompt_in_flight_across_a_reset_keeps_its_outcome_and_hides_no_request():
    save_lb("z", "echo rpm=2", "echo", flags=("--policy", "failover"))
    balancer = config.load("z")
    in_flight = state.select(balancer, now=NOW).ticket
    state.reset("z")
    for moment in (NOW + 1, NOW + 2):  # member 1 reaches its limit again after the reset
        assert state.select(balancer, now=moment).plan.order[0] == 0
    state.record(balancer, 0, ticket=in_flight, tokens=(5, 5), now=NOW + 3)
    assert state.stats(balancer, now=NOW + 3)[0]["input_tokens"] == 5
    # its outcome does not hide the two requests counted since the reset
    assert state.select(balancer, now=NOW + 4).plan.order[0] == 1


def test_rpd_is_exact_when_many_processes_reach_it_at_once():
    save_lb("race", "echo rpd=100", "echo rpd=100", flags=("--max-wait", "0"))
    counts = run_workers("lb:race", 8, 40)
    assert sum(done for done, _ in counts) == 200  # 2 members x 100, never a 101st
    limits_now = [member["limits"]["rpd"] for member in state.stats(config.load("race"))]
    assert limits_now == [{"used": 100, "limit": 100}] * 2


def test_stats_show_limits_tokens_timings_and_a_bar(local_openai):
    save_lb("st", "local-a key=work rpm=3", "local-a key=personal")
    for _ in range(3):
        invoke("-m", "lb:st", "hi")
    text = invoke("lb", "stats", "st").stdout
    assert "1. local-a (key: work, rpm=3)  █████████████······· 67% of traffic" in text
    assert "2 requests, 2 ok, 0 failed; tokens 2 in, 10 out" in text
    assert "limits now: rpm 2/3" in text
    assert re.search(r"first chunk median \d+ ms, p95 \d+ ms; total median \d+ ms", text)
    data = json.loads(invoke("lb", "stats", "st", "--json").stdout)[0]["members"][0]
    assert data["limits"] == {"rpm": {"used": 2, "limit": 3}}
    assert set(data["first_chunk"]) == {"median", "p95"}



def test_quota_exhausted_through_each_plugin_cools_the_member_down_for_an_hour(
    local_openai, local_anthropic
):
    save_lb("q", "local-a key=work", "claude-haiku-4.5", "local-b")
    local_openai.fail("quota", key="sk-work")
    local_anthropic.fail("quota")
    answers = [invoke("-m", "lb:q", "hi").stdout.strip() for _ in range(3)]
    assert answers == ["answer from b with sk-b"] * 3
    # each was asked once: an exhausted quota is not asked again for an hour
    assert (len(local_anthropic.requests), local_openai.seen("key").count("sk-work")) == (1, 1)
    members = json.loads(invoke("lb", "stats", "q", "--json").stdout)[0]["members"]
    for member in members[:2]:
        assert member["cooling_down_for"].endswith("quota exhausted")
        assert member["cooling_down_until"] > time.time() + 3500
    assert "(429 quota exhausted)" in invoke("lb", "stats", "q").stdout


def test_model_option_defaults_are_read_again_when_they_change(run_llm, monkeypatch):
    from llm_loadbalancer import delegate

    clock = [1000.0]
    monkeypatch.setattr(delegate, "_clock", lambda: clock[0])
    save_lb("d", "echo", "echo")
    run_llm("models", "options", "set", "echo", "example_bool", "true")
    assert "example_bool" in run_llm("-m", "lb:d", "hi").stdout
    run_llm("models", "options", "clear", "echo")
    # a process trusts what it read for a second (the file is looked at once a second)
    clock[0] += 0.5
    assert "example_bool" in run_llm("-m", "lb:d", "hi").stdout
    clock[0] += 0.5
    assert "example_bool" not in run_llm("-m", "lb:d", "hi").stdout
