"""Through llm's own OpenAI plugin, over HTTP, to a local OpenAI-compatible server on
127.0.0.1 (tests/local_openai.py): the set-ups users make (issue 3) and the faults they meet
(issue 4). Prompts run in this process, as a user types them (click's runner) or through llm's
Python API; new `llm` processes only where they are the point: many at once, and a cooldown
that a later process sees."""

import asyncio
import json
import subprocess
import sys

import llm
import pytest
from conftest import (
    end_cooldowns,
    invoke,
    last_logged,
    llm_process,
    save_lb,
)


@pytest.fixture
def save(local_openai):
    return save_lb


def prompt(*args):
    "An llm command in this process, which must succeed: what it printed."
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def prompt_in_a_new_process(*args):
    result = llm_process(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# --- the set-ups users make --------------------------------------------------------------


def test_same_model_different_keys_alternate(save, local_openai):
    save("keys", "local-a key=work", "local-a key=personal")
    answers = [prompt("-m", "lb:keys", "hi") for _ in range(4)]
    assert local_openai.seen("key") == ["sk-work", "sk-personal", "sk-work", "sk-personal"]
    assert answers == [
        "answer from a with sk-work",
        "answer from a with sk-personal",
        "answer from a with sk-work",
        "answer from a with sk-personal",
    ]


def test_same_model_on_two_endpoints_take_turns(save, local_openai):
    save("ep", "local-a", "local-b")
    for _ in range(4):
        prompt("-m", "lb:ep", "hi")
    assert local_openai.seen("endpoint") == ["a", "b", "a", "b"]
    assert {body["model"] for body in local_openai.seen("body")} == {"gpt-local"}


def test_each_request_carries_its_members_options(save, local_openai):
    save("opts", "local-a temperature=0.2", "local-a temperature=0.9 max_tokens=50")
    prompt("-m", "lb:opts", "hi")
    prompt("-m", "lb:opts", "hi")
    prompt("-m", "lb:opts", "-o", "temperature", "0.5", "hi")  # prompt time wins
    bodies = local_openai.seen("body")
    assert [b.get("temperature") for b in bodies] == [0.2, 0.9, 0.5]
    assert [b.get("max_tokens") for b in bodies] == [None, 50, None]


def test_first_chunk_arrives_before_the_server_sends_the_last(save, local_openai):
    save("stream", "local-a", "local-b")
    local_openai.fail("stall", endpoint="a")  # the first chunk; the rest after release()
    chunks = iter(llm.get_model("lb:stream").prompt("hi"))
    assert next(chunks) == "answer "
    assert local_openai.wait_hung(1)  # the server still holds the rest of the answer
    local_openai.release()
    assert list(chunks) == ["from ", "a ", "with ", "sk-a"]
    assert local_openai.seen("body")[0]["stream"] is True


def test_logs_show_member_usage_and_response_json(save, local_openai, run_llm):
    save("log", "local-a", "local-b")
    prompt("-m", "lb:log", "hello world")
    row = json.loads(run_llm("logs", "--json", "-n", "1").stdout)[0]
    assert row["model"] == "lb:log"
    assert row["resolved_model"] == "local-a"
    assert row["response"] == "answer from a with sk-a"
    assert (row["input_tokens"], row["output_tokens"]) == (2, 5)
    assert row["response_json"]["model"] == "gpt-local"


def test_without_streaming_the_member_answers_in_one_piece(save, local_openai):
    save("whole", "local-a key=work", "local-b")
    assert prompt("-m", "lb:whole", "--no-stream", "hello world") == "answer from a with sk-work"
    body = local_openai.seen("body")[0]
    assert body["stream"] is False and "stream_options" not in body
    row = last_logged()[0]
    assert row["resolved_model"] == "local-a"
    assert (row["input_tokens"], row["output_tokens"]) == (2, 5)


def test_key_given_at_prompt_time_reaches_members_without_their_own(save, local_openai, run_llm):
    save("given", "local-a key=work", "local-b")
    for _ in range(2):
        result = run_llm("-m", "lb:given", "--key", "sk-given", "hi")
        assert result.exit_code == 0, result.output
    assert local_openai.seen("key") == ["sk-work", "sk-given"]


def test_async_model_streams_and_fails_over_without_the_sdks_retries(save, local_openai):
    local_openai.no_sdk_retries = False  # as OpenAI answers: the SDK would retry the 429 itself
    save("as", "local-a key=work", "local-a key=personal")
    local_openai.fail("429", key="sk-work", times=1)  # a retry of it would be answered

    async def ask_twice():
        # One event loop for both prompts, as in an async program: llm's OpenAI plugin never
        # closes its AsyncOpenAI clients, and one collected while a second asyncio.run is
        # running would try to close its connections on the first, closed, loop.
        model = llm.get_async_model("lb:as")
        answers = []
        for _ in range(2):  # (an async comprehension inside another needs Python 3.11)
            answers.append([chunk async for chunk in model.prompt("hi")])
        return answers

    first, second = asyncio.run(ask_twice())
    assert first == second == ["answer ", "from ", "a ", "with ", "sk-personal"]
    # work was asked once and then cooled down, the SDK did not retry it
    assert local_openai.seen("key") == ["sk-work", "sk-personal", "sk-personal"]


def test_continued_conversation_reaches_the_member_with_its_history(save, local_openai):
    save("conv", "local-a", "local-b")
    prompt("-m", "lb:conv", "first question")
    prompt("-c", "second question")
    second = local_openai.seen("body")[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0]["content"] == "first question"
    assert second[1]["content"] == "answer from a with sk-a"
    assert local_openai.seen("endpoint") == ["a", "b"]  # not sticky: the next member


def test_sticky_conversation_stays_on_its_member(save, local_openai):
    save("sticky", "local-a", "local-b", flags=("--sticky",))
    prompt("-m", "lb:sticky", "first")
    prompt("-c", "second")
    prompt("-c", "third")
    assert local_openai.seen("endpoint") == ["a", "a", "a"]


def test_a_tool_chain_stays_on_one_member(save, local_openai):
    save("tools", "local-a", "local-b")
    prompt("-m", "lb:tools", "warm up")  # the rotation is now at local-b
    answer = prompt("-m", "lb:tools", "-T", "llm_version", "please CALL_TOOL")
    assert answer.startswith("tool said")
    assert local_openai.seen("endpoint") == ["a", "b", "b"]
    tool_turn = local_openai.seen("body")[2]["messages"]
    assert tool_turn[-1]["role"] == "tool"
    assert tool_turn[-2]["tool_calls"][0]["id"].startswith("call_b_")


def test_parallel_processes_give_exact_counts(save, local_openai):
    save("par", "local-a key=work", "local-a key=personal", "local-b")
    # llm's own logs.db is not made for many first uses or writers at once, whatever the
    # model ("table already exists" in its migrations, then "database is locked"): create it
    # first, and let the parallel prompts not log.
    assert invoke("-m", "echo", "creates logs.db").exit_code == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "llm", "--no-log", "-m", "lb:par", "hi"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(6)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 6, outputs
    seen = [f"{e}/{k}" for e, k in zip(local_openai.seen("endpoint"), local_openai.seen("key"))]
    assert {s: seen.count(s) for s in set(seen)} == {
        "a/sk-work": 2,
        "a/sk-personal": 2,
        "b/sk-b": 2,
    }


# --- faults --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "401", "close"])
def test_failover_answers_the_prompt(save, local_openai, fault):
    save("f", "local-a", "local-b")
    local_openai.fail(fault, endpoint="a")
    assert prompt("-m", "lb:f", "hi") == "answer from b with sk-b"
    endpoints = local_openai.seen("endpoint")
    assert endpoints[-1] == "b" and set(endpoints[:-1]) == {"a"}


def test_connection_refused_fails_over(save, local_openai):
    save("dead", "local-dead", "local-a")
    assert prompt("-m", "lb:dead", "hi") == "answer from a with sk-a"


def test_failing_member_is_skipped_by_later_processes_until_its_cooldown_ends(save, local_openai):
    save("cool", "local-a", "local-b")
    local_openai.fail("429:100", endpoint="a", times=1)  # Retry-After: 100
    # a fails and b answers; the next prompt is b's turn anyway; the one after is a's turn,
    # which a later process skips: a is cooling down
    answers = [prompt("-m", "lb:cool", "hi") for _ in range(2)]
    answers.append(prompt_in_a_new_process("-m", "lb:cool", "hi"))
    assert answers == ["answer from b with sk-b"] * 3
    assert local_openai.seen("endpoint") == ["a", "b", "b", "b"]  # a was not asked again
    end_cooldowns()  # the 100 s are over, for a later process too
    assert prompt_in_a_new_process("-m", "lb:cool", "hi") == "answer from a with sk-a"
    prompt("-m", "lb:cool", "hi")
    assert local_openai.seen("endpoint")[4:] == ["a", "b"]


def test_every_member_failing_lists_each_one(save, local_openai):
    # local-dead is not the last member: the last one keeps its SDK's retries, which for a
    # refused connection would cost a second and a half of backing off
    save("all", "local-dead", "local-a key=work", "local-b")
    local_openai.fail("429", endpoint="a")
    local_openai.fail("500", endpoint="b")
    result = invoke("-m", "lb:all", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: lb:all: all 3 members failed: local-dead: connection refused; "
        "local-a (key: work): 429 rate limited; local-b: 500 server error"
    )
    assert "sk-" not in result.stderr


def test_a_cut_stream_is_reported_not_retried_and_its_member_cools_down(save, local_openai):
    save("cut", "local-a", "local-b")
    local_openai.fail("cut", endpoint="a", times=1)  # one chunk, then the connection closes
    result = invoke("-m", "lb:cut", "hi")
    # What had arrived stays on screen, once, and the error follows: b is not asked, or the
    # user would see the start of one answer followed by another
    assert (result.exit_code, result.stdout, result.stderr) == (
        1,
        "answer ",
        "Error: lb:cut: member 1 (local-a): Connection error.\n",
    )
    assert local_openai.seen("endpoint") == ["a"]
    # a is cooling down after its connection error: the next prompts both go to b
    assert [prompt("-m", "lb:cut", "hi") for _ in range(2)] == ["answer from b with sk-b"] * 2
    assert local_openai.seen("endpoint") == ["a", "b", "b"]


def test_failover_policy_returns_to_the_primary(save, local_openai):
    save("prim", "local-a", "local-b", "local-dead", flags=("--policy", "failover"))
    local_openai.fail("503:100", endpoint="a", times=1)
    assert [prompt("-m", "lb:prim", "hi") for _ in range(2)] == ["answer from b with sk-b"] * 2
    end_cooldowns()
    assert prompt("-m", "lb:prim", "hi") == "answer from a with sk-a"
    assert local_openai.seen("endpoint") == ["a", "b", "b", "a"]


def test_stats_add_up_to_the_requests_made(save, local_openai, run_llm):
    save("st", "local-a", "local-b", "local-a key=work", flags=("--cooldown", "0"))
    local_openai.fail("500", key="sk-work")
    for _ in range(6):
        prompt("-m", "lb:st", "hi")
    members = json.loads(run_llm("lb", "stats", "st", "--json").stdout)[0]["members"]
    keys = local_openai.seen("key")
    assert sum(m["requests"] for m in members) == len(keys)
    assert [m["successes"] for m in members] == [keys.count("sk-a"), keys.count("sk-b"), 0]
    assert members[2]["failures"] == keys.count("sk-work") == 2
    assert members[2]["last_error"].startswith("500 server error")


def test_failover_does_not_wait_for_the_sdks_retries_but_the_last_member_keeps_them(
    save, local_openai
):
    local_openai.no_sdk_retries = False  # answer as OpenAI does: the SDK retries 429s itself
    save("fast", "local-a", "local-b")
    # Retry-After: 1 ms, which the SDK honours: its two retries cost no time here, but would
    # be seen (as they would cost seconds with the Retry-After of a real 429)
    local_openai.fail("429:0.001", endpoint="a")
    assert prompt("-m", "lb:fast", "hi") == "answer from b with sk-b"
    assert local_openai.seen("endpoint") == ["a", "b"]  # a asked once: no SDK retries
    # Alone (a is the only member left to try), a member keeps the SDK's retries
    save("alone", "local-a", "local-b", flags=("--no-failover",))
    result = invoke("-m", "lb:alone", "hi")
    assert result.exit_code == 1 and "429" in result.stderr
    assert local_openai.seen("endpoint")[2:] == ["a", "a", "a"]
