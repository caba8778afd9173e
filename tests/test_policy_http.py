"""Policies that follow the members' real speed: least-busy, lowest-latency and weighted random
(issue 11), through llm: prompts against the local OpenAI-compatible server (a member that
hangs or is slow, a process killed mid-prompt), and random over fake models. The choices are
pure functions, tested in test_policy.py; what the state tells them (prompts in flight,
timings), for each backend, in test_store.py."""

import json
import random
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import llm
from conftest import invoke, save_lb

from llm_loadbalancer import delegate, store
from llm_loadbalancer.store import rules


def test_least_busy_sends_the_next_prompt_to_an_idle_member(local_openai):
    save_lb("lb", "local-a", "local-b", flags=("--policy", "least-busy"))
    local_openai.fail("hang", endpoint="a", times=1)
    answers = []
    worker = threading.Thread(
        target=lambda: answers.append(llm.get_model("lb:lb").prompt("hi").text())
    )
    worker.start()
    assert local_openai.wait_hung()
    # a is busy: round-robin would give the third prompt to a, least-busy gives it to b
    assert [invoke("-m", "lb:lb", "hi").stdout.strip() for _ in range(2)] == [
        "answer from b with sk-b"
    ] * 2
    local_openai.release()
    worker.join(30)
    assert answers == ["answer from a with sk-a"]
    assert local_openai.seen("endpoint") == ["a", "b", "b"]


def test_a_killed_processes_prompt_stops_counting_as_in_flight(local_openai):
    save_lb("lb", "local-a", "local-b", flags=("--policy", "least-busy"))
    local_openai.fail("hang", endpoint="a", times=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm", "--no-log", "-m", "lb:lb", "hi"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert local_openai.wait_hung(timeout=60)
    proc.kill()
    proc.wait()
    # a's prompt still counts while its lease lasts (nothing asks the system about a process) ...
    assert invoke("-m", "lb:lb", "hi").stdout.strip() == "answer from b with sk-b"
    # ... and not once it has run out: time moves through the state, by a lease
    with closing(sqlite3.connect(store.file_of())) as db, db:
        db.execute("update requests set at = at - ?1, lease = lease - ?1", [rules.LEASE])
    # a's prompt is gone with its process: both members are idle, and the rotation decides
    assert [invoke("-m", "lb:lb", "hi").stdout.strip() for _ in range(2)] == [
        "answer from a with sk-a",
        "answer from b with sk-b",
    ]


def test_lowest_latency_prefers_the_fast_member_and_still_samples_the_others(
    local_openai, monkeypatch
):
    monkeypatch.setattr(delegate, "RNG", random.Random(11))
    save_lb(
        "fast", "local-a key=work", "local-a key=personal", flags=("--policy", "lowest-latency")
    )
    local_openai.fail("slow:0.2", key="sk-work")  # work answers 200 ms later than personal
    for _ in range(2):  # each member is tried once: no timings yet
        llm.get_model("lb:fast").prompt("hi").text()
    assert local_openai.seen("key") == ["sk-work", "sk-personal"]
    for _ in range(30):
        llm.get_model("lb:fast").prompt("hi").text()
    later = local_openai.seen("key")[2:]
    assert later.count("sk-personal") >= 24  # the fast one, but for exploring
    assert later.count("sk-work") >= 1  # its estimate kept fresh
    members = json.loads(invoke("lb", "stats", "fast", "--json").stdout)[0]["members"]
    assert members[0]["first_chunk"]["median"] > members[1]["first_chunk"]["median"]


def test_random_keeps_cooldowns_failover_and_tool_turns(fake_models):
    monkeypatch_rng = random.Random(5)
    delegate.RNG, saved = monkeypatch_rng, delegate.RNG
    try:
        save_lb(
            "r",
            "flaky name=a fail=429",
            "flaky name=b",
            "flaky name=c",
            flags=("--policy", "random"),
        )
        answers = {invoke("-m", "lb:r", "hi").stdout.strip() for _ in range(12)}
    finally:
        delegate.RNG = saved
    assert answers <= {"answer from b", "answer from c"} and answers
    stats = json.loads(invoke("lb", "stats", "r", "--json").stdout)[0]["members"]
    assert stats[0]["requests"] == 1  # asked once, then cooling down: never again
