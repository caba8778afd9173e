"""Weights, per-member rate limits and quotas, waiting for a free member (issue 10), through
llm: the member settings, and prompts against the local OpenAI-compatible server (several
processes at once), which counts what reached each key.

The window arithmetic and the choices are pure functions, tested in test_policy.py (what an
exhausted quota looks like: test_failures.py); what the state counts (limit windows, waits,
cooldowns, the rotation across processes), for each backend, in test_store.py."""

import json
import re
import sqlite3
import time
from contextlib import closing

import pytest
from conftest import invoke, run_workers, save_lb
from store_helpers import Ask

from llm_loadbalancer import config, store

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


def test_token_limit_from_the_usage_the_server_reports(local_openai):
    save_lb("t", "local-a key=work tpm=10", "local-a key=personal", flags=("--max-wait", "0"))
    for _ in range(4):
        assert invoke("-m", "lb:t", "--no-stream", "one two three").exit_code == 0
    # the first answer used 3 + 5 = 8 tokens; the next prompt is estimated at 9 tokens of input
    # (13 bytes at 3 a token, 4 for the message) and 5 of answer, like the last: 8 + 14 > 10
    assert local_openai.seen("key") == ["sk-work", "sk-personal", "sk-personal", "sk-personal"]
    members = json.loads(invoke("lb", "stats", "t", "--json").stdout)[0]["members"]
    assert members[0]["limits"]["tpm"] == {"used": 8, "limit": 10, "reserved": 0}
    assert (members[0]["input_tokens"], members[0]["output_tokens"]) == (3, 5)


@pytest.mark.parametrize(
    "state, usage",
    [
        ("file", {"prompt_tokens": 10, "completion_tokens": 140}),
        # an input the text's estimate misses (a template): the next estimates add what it missed
        ("redis", {"prompt_tokens": 150, "completion_tokens": 0}),
    ],
)
def test_token_limits_hold_when_prompts_run_at_the_same_time(local_openai, state, usage, request):
    # issue 21's check: 8 processes x 2 prompts at once, two keys at tpm=300, answers of 150
    # tokens taking half a second: prompts in flight reserve their estimates before they report
    flags = ["--max-wait", "0"]
    if state == "redis":
        flags += ["--state", request.getfixturevalue("redis_server").url]
    save_lb("conc", "local-a key=work tpm=300", "local-a key=personal tpm=300", flags=flags)
    local_openai.usage = usage
    local_openai.fail("slow:0.5")
    counts = run_workers("lb:conc", 8, 2)
    assert sum(done + refused for done, refused in counts) == 16  # answered, or the one error
    seen = local_openai.seen("key")
    assert sum(done for done, _ in counts) == len(seen)
    assert seen.count("sk-work") <= 2 and seen.count("sk-personal") <= 2  # 300 tokens each
    for member in json.loads(invoke("lb", "stats", "conc", "--json").stdout)[0]["members"]:
        assert member["limits"]["tpm"]["used"] <= 300
        assert member["limits"]["tpm"]["reserved"] == 0  # every prompt ended


def test_a_prompt_waits_for_prompts_in_flight_at_most_max_wait_in_all(user_path):
    save_lb("w", "echo tpm=300", "echo tpm=300", flags=("--max-wait", "1"))
    balancer = config.load("w")
    for member in range(2):  # a prompt in flight on each key, elsewhere: no report yet
        store.open_store(balancer).claim(balancer, member, demand=Ask(10))
    result = invoke("-m", "lb:w", "hi")  # looks again each second; fails once it waited 1 s
    assert result.exit_code == 1
    assert re.fullmatch(
        r"lb:w: every member is at its limit; waiting 1 s for member \d \(echo, tpm=300\)\n"
        r"Error: lb:w: every member is at its limit or inside a reset its provider stated; "
        r"waited max_wait \(1 s; llm lb save --max-wait\) and member \d \(echo, tpm=300\) has "
        r"no room yet\n",
        result.stderr,
    ), result.stderr


def test_a_prompt_refused_before_it_is_sent_frees_its_reservation(fake_models, user_path):
    save_lb("rej", "strict tpm=300", "strict tpm=300", flags=("--max-wait", "0"))
    refused = invoke("-m", "lb:rej", "-o", "temperature", "1.5", "hi")
    assert refused.exit_code == 1 and "temperature" in refused.stderr
    members = json.loads(invoke("lb", "stats", "rej", "--json").stdout)[0]["members"]
    assert [m["limits"]["tpm"]["reserved"] for m in members] == [0, 0]
    assert invoke("-m", "lb:rej", "hi").exit_code == 0


def age_requests(seconds):
    "Time moves through the state file: every request counted was sent ``seconds`` earlier."
    with closing(sqlite3.connect(store.file_of())) as db, db:
        db.execute("update bucket_requests set at = at - ?", [seconds])


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
        r"Error: lb:busy: every member is at its limit or inside a reset its provider stated; "
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
    assert "every member is at its limit or inside a reset its provider stated" in result.stderr
    assert len(local_openai.requests) == 2


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
    from llm_loadbalancer import model_options

    clock = [1000.0]
    monkeypatch.setattr(model_options, "clock", lambda: clock[0])
    save_lb("d", "echo", "echo")
    run_llm("models", "options", "set", "echo", "example_bool", "true")
    assert "example_bool" in run_llm("-m", "lb:d", "hi").stdout
    run_llm("models", "options", "clear", "echo")
    # a process trusts what it read for a second (the file is looked at once a second)
    clock[0] += 0.5
    assert "example_bool" in run_llm("-m", "lb:d", "hi").stdout
    clock[0] += 0.5
    assert "example_bool" not in run_llm("-m", "lb:d", "hi").stdout


def test_a_keys_limit_holds_across_a_save_force_and_a_second_balancer(local_openai):
    flags = ("--max-wait", "0", "--policy", "failover")
    save_lb("one", "local-a key=work rpm=2", "local-a key=personal", flags=flags)
    for _ in range(2):
        assert invoke("-m", "lb:one", "hi").exit_code == 0
    # saved again with member 2 changed: key work has had its 2 requests of the minute
    save_lb("one", "local-a key=work rpm=2", "local-b key=personal", flags=(*flags, "--force"))
    assert invoke("-m", "lb:one", "hi").exit_code == 0
    # and a second balancer using the key is held by the same limit
    save_lb("two", "local-a key=work rpm=5", "local-b key=personal", flags=flags)
    assert invoke("-m", "lb:two", "hi").exit_code == 0
    assert local_openai.seen("key") == ["sk-work", "sk-work", "sk-personal", "sk-personal"]
    listed = invoke("lb", "list")
    assert (
        "note: member 1 (local-a, key: work, rpm=5): rpm=2 applies, the strictest given for its "
        "model and key (by lb:one)"
    ) in listed.stdout
    rows = {row["name"]: row for row in json.loads(invoke("lb", "list", "--json").stdout)}
    assert rows["two"]["stricter_limits"] == [
        {"member": 1, "limits": {"rpm": 2}, "given_by": ["lb:one"]}
    ]
    assert "stricter_limits" not in rows["one"]


class Places:
    """Where a test's state lives: the llm folder's file, or a Redis server shared by two llm
    folders (two machines: each prompt from the next folder in turn). ``ask`` prompts from the
    next place; ``save`` and ``keys`` apply to every folder; ``end_cooldowns`` moves time on
    through the state; ``envs``: an environment per folder, for processes."""

    def __init__(self, state, user_path, monkeypatch, redis_server=None):
        import shutil

        self.monkeypatch, self.server, self.turn = monkeypatch, redis_server, 0
        self.folders = [user_path]
        self.flags = ()
        if state == "redis":
            other = user_path.parent / "llm-user-b"
            shutil.copytree(user_path, other)  # (the local server's models and keys)
            self.folders.append(other)
            self.flags = ("--state", redis_server.url)

    def use(self, number):
        self.monkeypatch.setenv("LLM_USER_PATH", str(self.folders[number]))

    def save(self, name, *members, flags=()):
        for number in range(len(self.folders)):
            self.use(number)
            save_lb(name, *members, flags=(*flags, *self.flags))

    def keys(self, **keys):
        from conftest import set_keys

        for folder in self.folders:
            set_keys(folder, **keys)

    def ask(self, *args):
        self.use(self.turn % len(self.folders))
        self.turn += 1
        return invoke(*args)

    @property
    def envs(self):
        return [{"LLM_USER_PATH": str(folder)} for folder in self.folders]

    def end_cooldowns(self):
        "Every cooldown ends now (in the file, or each on record in the server)."
        from conftest import end_cooldowns

        if self.server is None:
            return end_cooldowns()
        client = self.server.client()
        for key in client.scan_iter("*cooldowns"):
            for member, row in client.hgetall(key).items():
                client.hset(key, member, "0.000000|" + row.split("|", 1)[1])
            client.incr(key[: -len("cooldowns")] + "version")  # (a change choices depend on)


@pytest.fixture(params=["file", "redis"])
def places(request, user_path, monkeypatch):
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    request.getfixturevalue("local_openai")  # (before the folders are copied)
    return Places(request.param, user_path, monkeypatch, server)


def test_tiers_spend_the_free_keys_first_and_come_back_to_them(local_openai, places):
    # issue 22's check: ka and kb (tier 1, rpm=2), kc (tier 2): ten prompts in a minute
    places.keys(ka="sk-ka", kb="sk-kb", kc="sk-kc")
    places.save("t", "local-a key=ka tier=1 rpm=2", "local-a key=kb rpm=2", "local-a key=kc tier=2")
    for _ in range(10):
        assert places.ask("-m", "lb:t", "hi").exit_code == 0
    seen = local_openai.seen("key")
    assert (seen.count("sk-ka"), seen.count("sk-kb"), seen.count("sk-kc")) == (2, 2, 6)
    stats = json.loads(invoke("lb", "stats", "t", "--json").stdout)[0]
    assert stats["tiers"] == {"1": 4, "2": 6}
    assert "tier 1: 4 requests; tier 2: 6 requests" in invoke("lb", "stats", "t").stdout
    listed = invoke("lb", "list").stdout
    assert "local-a (key: kc, tier=2)" in listed


def test_when_the_lower_tier_fails_the_higher_answers_until_its_cooldowns_end(
    local_openai, places
):
    places.keys(ka="sk-ka", kb="sk-kb", kc="sk-kc")
    places.save("f", "local-a key=ka", "local-a key=kb", "local-a key=kc tier=2")
    local_openai.fail("429:2", key="sk-ka")
    local_openai.fail("429:2", key="sk-kb")
    first = places.ask("-m", "lb:f", "hi")
    assert first.exit_code == 0 and first.stdout.strip() == "answer from a with sk-kc"
    assert places.ask("-m", "lb:f", "hi").stdout.strip() == "answer from a with sk-kc"
    local_openai.heal()
    places.end_cooldowns()
    assert places.ask("-m", "lb:f", "hi").stdout.strip() == "answer from a with sk-ka"
    assert local_openai.seen("key") == ["sk-ka", "sk-kb", "sk-kc", "sk-kc", "sk-ka"]


def test_a_wait_names_the_tier_of_the_member_that_frees_up_first(user_path):
    from conftest import set_keys

    set_keys(user_path, k1="one", k2="two")
    save_lb("tw", "echo key=k1 rpm=1", "echo key=k2 rpm=1 tier=2", flags=("--max-wait", "0"))
    for _ in range(2):
        assert invoke("-m", "lb:tw", "hi").exit_code == 0
    result = invoke("-m", "lb:tw", "hi")
    assert result.exit_code == 1
    assert "the first to free up is member 1 (echo, key: k1, rpm=1) of tier 1, in" in result.stderr


def test_eight_processes_send_one_probe_to_a_member_whose_cooldown_just_ended(
    local_openai, places
):
    # issue 22's check: the probe's answer is held for a second; the others go elsewhere (with
    # Redis, the processes prompt from two llm folders in turn)
    places.save("pr", "local-a key=work", "local-a key=personal", flags=("--policy", "failover"))
    local_openai.fail("429", key="sk-work", times=1)
    assert places.ask("-m", "lb:pr", "hi").exit_code == 0  # work fails: personal answers
    places.end_cooldowns()  # its cooldown has just ended
    local_openai.fail("slow:1", key="sk-work")
    assert run_workers("lb:pr", 8, 1, envs=places.envs) == [(1, 0)] * 8
    work = [r["time"] for r in local_openai.requests if r["key"] == "sk-work"][1:]
    # the probe first; another request to it only once its answer came (the server holds it
    # for a second before answering: every later one arrived after that, by its own clock)
    assert work and all(later >= work[0] + 1.0 for later in work[1:]), work
    local_openai.heal()
    assert places.ask("-m", "lb:pr", "hi").stdout.strip() == "answer from a with sk-work"  # back


def test_a_probe_that_fails_again_cools_the_member_down_twice_as_long(local_openai, places):
    places.save("pf", "local-a key=work", "local-a key=personal", flags=("--policy", "failover"))
    local_openai.fail("429", key="sk-work")
    places.ask("-m", "lb:pf", "hi")
    places.end_cooldowns()
    places.ask("-m", "lb:pf", "hi")  # its probe fails
    member = json.loads(places.ask("lb", "stats", "pf", "--json").stdout)[0]["members"][0]
    assert 55 <= member["cooling_down_until"] - time.time() <= 61  # 60 s, twice the 30
