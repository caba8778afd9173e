"""Members from two real provider plugins, llm's OpenAI plugin and llm-anthropic, each talking
HTTP to a local server on 127.0.0.1 that speaks its API (tests/local_openai.py,
tests/local_anthropic.py): the design's four scenarios, conversations across providers,
failover through each plugin and its SDK's retries, the first-chunk timeout, the failure
classes and the messages that name the member (issue 8). In-process, through llm's Python API
and click's runner, unless a new process is the point."""

import asyncio
import json
import threading
import time

import llm
import pytest
import yaml
from conftest import invoke, last_logged, save_lb, set_keys

CLAUDE = "anthropic/claude-haiku-4-5-20251001"  # what claude-haiku-4.5 resolves to


@pytest.fixture
def servers(local_openai, local_anthropic, user_path):
    """Both servers, and two gateway models on the OpenAI-compatible one (endpoint gw) serving
    "the same" Claude model: gw-claude, and gw-think which takes reasoning_effort."""
    path = user_path / "extra-openai-models.yaml"
    models = yaml.safe_load(path.read_text())
    for model_id, extra in (("gw-claude", {}), ("gw-think", {"reasoning": True})):
        models.append(
            {
                "model_id": model_id,
                "model_name": "claude-haiku-4-5",
                "api_base": local_openai.api_base("gw"),
                "api_key_name": "gw",
                "supports_tools": True,
                **extra,
            }
        )
    path.write_text(yaml.safe_dump(models))
    from conftest import set_keys

    set_keys(user_path, gw="sk-gw")
    return local_openai, local_anthropic


def answer(model_id, text="hi", *, use_async=False, stream=True, **kwargs):
    "One prompt through llm's Python API: (the text, the response)."
    if use_async:

        async def run():
            response = llm.get_async_model(model_id).prompt(text, stream=stream, **kwargs)
            return await response.text(), response

        return asyncio.run(run())
    response = llm.get_model(model_id).prompt(text, stream=stream, **kwargs)
    return response.text(), response


MODES = pytest.mark.parametrize(
    "use_async,stream",
    [(False, True), (False, False), (True, True), (True, False)],
    ids=["sync-stream", "sync-no-stream", "async-stream", "async-no-stream"],
)


def cli(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


# --- the design's four scenarios -----------------------------------------------------------


@MODES
def test_a_one_provider_two_stored_keys(servers, use_async, stream):
    _, anthropic = servers
    save_lb("keys", "claude-haiku-4.5 key=ant-work", "claude-haiku-4.5 key=ant-personal")
    texts = [answer("lb:keys", use_async=use_async, stream=stream)[0] for _ in range(3)]
    assert texts == [
        "answer from anthropic with sk-ant-work",
        "answer from anthropic with sk-ant-personal",
        "answer from anthropic with sk-ant-work",
    ]
    assert anthropic.seen("key") == ["sk-ant-work", "sk-ant-personal", "sk-ant-work"]


@MODES
def test_b_one_model_through_two_providers(servers, use_async, stream):
    gateway, anthropic = servers
    save_lb("family", "gw-claude", "claude-haiku-4.5 max_tokens=300")
    first, r1 = answer("lb:family", use_async=use_async, stream=stream)
    second, r2 = answer("lb:family", use_async=use_async, stream=stream)
    assert first == "answer from gw with sk-gw"
    assert second == "answer from anthropic with sk-ant-default"
    assert [b["model"] for b in gateway.seen("body")] == ["claude-haiku-4-5"]
    assert [(b["model"], b["max_tokens"]) for b in anthropic.seen("body")] == [
        ("claude-haiku-4-5-20251001", 300)
    ]
    # each member wrote its usage and resolved model onto the response, as it does alone
    assert (r1.resolved_model, r2.resolved_model) == ("gw-claude", CLAUDE)
    usage = [asyncio.run(r.usage()) if use_async else r.usage() for r in (r1, r2)]
    assert [(u.input, u.output) for u in usage] == [(1, 5), (1, 5)]


def test_b_through_the_command_line_every_turn_is_logged(servers):
    save_lb("family", "gw-claude", "claude-haiku-4.5")
    for flags in ((), (), ("--no-stream",), ("--no-stream",)):
        assert cli("-m", "lb:family", *flags, "hi").strip().startswith("answer from")
    rows = last_logged(4)
    assert [row["resolved_model"] for row in rows] == ["gw-claude", CLAUDE] * 2
    assert [row["model"] for row in rows] == ["lb:family"] * 4
    assert [row["response"] for row in rows] == [
        "answer from gw with sk-gw",
        "answer from anthropic with sk-ant-default",
    ] * 2
    assert all(row["input_tokens"] == 1 and row["output_tokens"] == 5 for row in rows)


@MODES
def test_c_two_thinking_members(servers, use_async, stream):
    gateway, anthropic = servers
    save_lb(
        "think",
        "gw-think reasoning_effort=low",
        "gw-think reasoning_effort=high",
        "claude-haiku-4.5 thinking=true",
    )
    texts = [answer("lb:think", use_async=use_async, stream=stream)[0] for _ in range(3)]
    assert texts[2] == "answer from anthropic with sk-ant-default"
    assert [b["reasoning_effort"] for b in gateway.seen("body")] == ["low", "high"]
    assert anthropic.seen("body")[0]["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def test_c_the_thinking_is_shown_and_logged(servers):
    save_lb("think", "claude-haiku-4.5 thinking=true", "gw-think reasoning_effort=low")
    response = llm.get_model("lb:think").prompt("hi")
    events = [(event.type, event.chunk) for event in response.stream_events()]
    assert ("reasoning", "thinking about it") in events
    assert response.text() == "answer from anthropic with sk-ant-default"
    result = invoke("-m", "lb:think", "hi")  # the next member: no thinking to show
    assert result.stdout.strip() == "answer from gw with sk-gw"


def test_d_a_thinking_member_and_a_plain_one(servers):
    gateway, anthropic = servers
    save_lb("mixed", "claude-haiku-4.5 thinking=true", "gw-claude")
    cli("-m", "lb:mixed", "hi")
    cli("-m", "lb:mixed", "hi")
    rows = last_logged(2)
    assert [row["reasoning"] for row in rows] == ["thinking about it", None]
    assert anthropic.seen("body")[0]["thinking"]["type"] == "enabled"
    assert "reasoning_effort" not in gateway.seen("body")[0]
    # options given at prompt time reach each member as its own
    cli("-m", "lb:mixed", "-o", "temperature", "0.3", "hi")
    assert anthropic.seen("body")[-1]["temperature"] == 0.3


def test_continuing_a_conversation_across_providers_keeps_the_whole_history(servers):
    gateway, anthropic = servers
    save_lb("family", "gw-claude", "claude-haiku-4.5")
    cli("-m", "lb:family", "one")
    for turn in ("two", "three", "four"):
        cli("-c", turn)
    sizes = [len(b["messages"]) for b in gateway.seen("body")]
    assert sizes == [1, 5]  # turns one and three
    messages = anthropic.seen("body")[1]["messages"]  # turn four: all seven messages
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[1]["content"][0]["text"] == "answer from gw with sk-gw"
    assert messages[3]["content"][0]["text"] == "answer from anthropic with sk-ant-default"


# --- failover through each plugin, and the SDKs' own retries ---------------------------------


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("first", ["claude-haiku-4.5", "gw-claude"])
def test_failover_asks_a_failing_member_once_whatever_its_plugin(servers, first, use_async):
    gateway, anthropic = servers
    gateway.no_sdk_retries = anthropic.no_sdk_retries = False  # the SDKs would retry a 429
    other = "gw-claude" if first == "claude-haiku-4.5" else "claude-haiku-4.5"
    failing = anthropic if first == "claude-haiku-4.5" else gateway
    failing.fail("429:20")  # Retry-After: 20 (the SDK alone would wait 40 s)
    save_lb("fo", first, other)
    text, _ = answer("lb:fo", use_async=use_async)
    assert text.startswith("answer from ")
    assert len(failing.requests) == 1  # asked once: the next member was the retry
    assert len((gateway if failing is anthropic else anthropic).requests) == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_the_last_member_tried_keeps_its_sdks_retries(servers, use_async):
    _, anthropic = servers
    anthropic.no_sdk_retries = False
    anthropic.fail("429:0", times=2)  # its SDK retries twice; the third request is answered
    save_lb("last", "claude-haiku-4.5", "gw-claude", flags=("--no-failover",))
    text, _ = answer("lb:last", use_async=use_async)
    assert text == "answer from anthropic with sk-ant-default"
    assert len(anthropic.requests) == 3


def test_other_threads_keep_their_sdk_retries_while_a_member_runs(servers):
    gateway, anthropic = servers
    gateway.no_sdk_retries = False
    anthropic.fail("hang", times=1)
    save_lb("busy", "claude-haiku-4.5", "gw-claude")
    answers = []
    worker = threading.Thread(target=lambda: answers.append(answer("lb:busy")[0]))
    worker.start()
    assert anthropic.wait_hung()  # the member is running now, with its retries off
    gateway.fail("429:0", endpoint="gw", times=2)
    direct, _ = answer("gw-claude")  # another model in another thread: its SDK retries
    assert direct == "answer from gw with sk-gw"
    assert len(gateway.requests) == 3
    anthropic.release()
    worker.join(30)
    assert answers == ["answer from anthropic with sk-ant-default"]


def test_other_asyncio_tasks_keep_their_sdk_retries_while_a_member_runs(servers):
    gateway, anthropic = servers
    gateway.no_sdk_retries = False
    anthropic.fail("hang", times=1)
    save_lb("busy", "claude-haiku-4.5", "gw-claude")

    async def direct_while_the_member_hangs():
        await asyncio.to_thread(anthropic.wait_hung)
        gateway.fail("429:0", endpoint="gw", times=2)
        text = await llm.get_async_model("gw-claude").prompt("hi").text()
        anthropic.release()
        return text

    async def both():
        lb = llm.get_async_model("lb:busy").prompt("hi").text()
        return await asyncio.gather(lb, direct_while_the_member_hangs())

    assert asyncio.run(both()) == [
        "answer from anthropic with sk-ant-default",
        "answer from gw with sk-gw",
    ]
    assert len(gateway.requests) == 3


# --- the first-chunk timeout -----------------------------------------------------------------


def join_abandoned_members():
    "Wait for abandoned sync members to finish: what they do afterwards must leave no trace."
    for thread in threading.enumerate():
        if thread.name == "llm-loadbalancer member":
            thread.join(30)


@MODES
def test_a_member_that_gives_no_first_chunk_in_time_is_abandoned(servers, use_async, stream):
    gateway, anthropic = servers
    anthropic.fail("hang", times=1)  # never answers until released
    save_lb("slow", "claude-haiku-4.5", "gw-claude", flags=("--timeout", "1"))
    text, response = answer("lb:slow", use_async=use_async, stream=stream)
    assert text == "answer from gw with sk-gw"
    assert response.resolved_model == "gw-claude"
    # the late answer arrives now, and changes nothing
    anthropic.release()
    assert anthropic.wait_released()
    join_abandoned_members()
    assert text == (asyncio.run(response.text()) if use_async else response.text())
    usage = asyncio.run(response.usage()) if use_async else response.usage()
    assert (usage.input, usage.output) == (1, 5)
    assert response.resolved_model == "gw-claude"
    assert "anthropic" not in json.dumps(response.response_json)
    # abandoned, it cools down like after a 5xx: the next prompts skip it
    assert [answer("lb:slow")[0] for _ in range(2)] == ["answer from gw with sk-gw"] * 2
    assert len(anthropic.requests) == 1
    stats = json.loads(cli("lb", "stats", "slow", "--json"))[0]["members"]
    what = "first chunk" if stream else "answer"
    assert stats[0]["last_error"] == f"timed out: no {what} within 1 s (the balancer's timeout)"
    assert stats[0]["cooling_down_until"] is not None


def test_a_late_answer_never_reaches_the_output_or_the_log(servers):
    _, anthropic = servers
    anthropic.fail("hang", times=1)
    save_lb("slow", "claude-haiku-4.5", "gw-claude", flags=("--timeout", "1"))
    result = invoke("-m", "lb:slow", "hi")
    assert (result.exit_code, result.stdout) == (0, "answer from gw with sk-gw\n")
    anthropic.release()
    assert anthropic.wait_released()
    join_abandoned_members()
    (row,) = last_logged(5)
    assert row["response"] == "answer from gw with sk-gw"
    assert row["resolved_model"] == "gw-claude"
    assert "anthropic" not in json.dumps(row)


def test_without_a_timeout_a_slow_member_is_waited_for(servers):
    _, anthropic = servers
    anthropic.fail("hang", times=1)
    save_lb("patient", "claude-haiku-4.5", "gw-claude")
    answers = []
    worker = threading.Thread(target=lambda: answers.append(answer("lb:patient")[0]))
    worker.start()
    assert anthropic.wait_hung()
    anthropic.release()
    worker.join(30)
    assert answers == ["answer from anthropic with sk-ant-default"]


def test_timeout_is_saved_and_checked(servers, user_path):
    save_lb("t", "gw-claude", "claude-haiku-4.5", flags=("--timeout", "2.5"))
    assert "timeout: 2.5" in (user_path / "loadbalancers" / "t.yaml").read_text()
    for bad in ("0", "-1", "nan"):
        result = invoke("lb", "save", "bad", "gw-claude", "gw-claude", "--timeout", bad)
        assert result.exit_code == 1
        assert result.stderr.startswith(
            "Error: timeout (the time a member has for its first chunk) must be a number of "
            "seconds > 0 and at most 86400 (one day)"
        )


# --- failure classes and messages ------------------------------------------------------------


@pytest.mark.parametrize("plugin", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_an_answer_that_cannot_be_decoded_fails_over_and_cools_down(servers, plugin, stream):
    gateway, anthropic = servers
    first = "claude-haiku-4.5" if plugin == "anthropic" else "gw-claude"
    other = "gw-claude" if plugin == "anthropic" else "claude-haiku-4.5"
    (anthropic if plugin == "anthropic" else gateway).fail("malformed", times=1)
    save_lb("garbled", first, other)
    text, _ = answer("lb:garbled", stream=stream)
    assert text.startswith("answer from ")
    assert (plugin == "anthropic") == text.startswith("answer from gw")
    stats = json.loads(cli("lb", "stats", "garbled", "--json"))[0]["members"]
    assert stats[0]["last_error"].startswith("protocol error")
    assert stats[0]["cooling_down_until"] is not None


def test_404_fails_over_and_cools_down_like_a_bad_key(servers):
    gateway, anthropic = servers
    anthropic.fail("404")
    save_lb("nf", "claude-haiku-4.5", "gw-claude")
    assert answer("lb:nf")[0] == "answer from gw with sk-gw"
    (first, _) = json.loads(cli("lb", "stats", "nf", "--json"))[0]["members"]
    assert first["last_error"].startswith("404 not found")
    import time

    assert first["cooling_down_until"] > time.time() + 500  # 10 minutes, as after a 401


BROKEN = "sk-broken-secret\nsecond-line"  # a key stored with a line break in it


def files_with(user_path, text):
    "The files under the llm folder, besides keys.json, that hold ``text``."
    return [
        path.name
        for path in user_path.rglob("*")
        if path.is_file() and path.name != "keys.json" and text.encode() in path.read_bytes()
    ]


@pytest.mark.parametrize("plugin", ["openai", "anthropic"])
def test_a_key_with_a_newline_is_a_bad_key_and_fails_over(servers, plugin, user_path):
    gateway, anthropic = servers
    set_keys(user_path, broken=BROKEN)
    first = "claude-haiku-4.5 key=broken" if plugin == "anthropic" else "gw-claude key=broken"
    other = "gw-claude" if plugin == "anthropic" else "claude-haiku-4.5"
    save_lb("nl", first, other)
    result = invoke("-m", "lb:nl", "hi", env={"LLM_LOADBALANCER_DEBUG": "1"})
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("answer from")
    assert "member 1 (" in result.stderr and "failed (bad key), trying member 2" in result.stderr
    assert len((anthropic if plugin == "anthropic" else gateway).requests) == 0  # none was sent
    text = cli("lb", "stats", "nl")
    assert "last error: bad key: the HTTP client refused to send a header: its value" in text
    (member, _) = json.loads(cli("lb", "stats", "nl", "--json"))[0]["members"]
    assert member["cooling_down_until"] > time.time() + 500  # 10 minutes, as after a 401
    for shown in (result.output, text, cli("lb", "stats", "nl", "--json")):
        assert "secret" not in shown and "second-line" not in shown
    assert files_with(user_path, "broken-secret") == []


def test_every_member_failing_names_the_bad_key(servers, user_path):
    _, anthropic = servers
    anthropic.fail("429")
    set_keys(user_path, broken=BROKEN)
    save_lb("nl", "gw-claude key=broken", "claude-haiku-4.5")
    result = invoke("-m", "lb:nl", "hi")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: lb:nl: all 2 members failed: gw-claude (key: broken): bad key; "
        "claude-haiku-4.5: 429 rate limited\n"
    )


@pytest.mark.parametrize("plugin", ["openai", "anthropic"])
def test_an_error_every_member_would_give_names_the_member_and_is_not_failed_over(servers, plugin):
    gateway, anthropic = servers
    (anthropic if plugin == "anthropic" else gateway).fail("400")
    first = "claude-haiku-4.5 key=ant-work" if plugin == "anthropic" else "gw-claude"
    save_lb("bad", first, "gw-claude" if plugin == "anthropic" else "claude-haiku-4.5")
    result = invoke("-m", "lb:bad", "hi")
    assert result.exit_code == 1
    label = "claude-haiku-4.5, key: ant-work" if plugin == "anthropic" else "gw-claude"
    line = result.stderr.strip()
    assert line.startswith(f"Error: lb:bad: member 1 ({label}): Error code: 400")
    assert "\n" not in line and "sk-" not in line
    assert len(gateway.requests) + len(anthropic.requests) == 1


def test_python_api_users_reach_the_members_own_exception(servers):
    import anthropic as anthropic_sdk

    _, anthropic = servers
    anthropic.fail("400")
    save_lb("bad", "claude-haiku-4.5 key=ant-work", "gw-claude")
    with pytest.raises(anthropic_sdk.BadRequestError) as caught:
        llm.get_model("lb:bad").prompt("hi").text()
    assert str(caught.value).startswith("lb:bad: member 1 (claude-haiku-4.5, key: ant-work): ")
    assert caught.value.status_code == 400
    original = caught.value.__cause__
    assert isinstance(original, anthropic_sdk.BadRequestError)
    assert not str(original).startswith("lb:")


def test_a_stream_cut_after_text_names_the_member(servers):
    gateway, anthropic = servers
    anthropic.fail("cut", times=1)
    save_lb("cut", "claude-haiku-4.5 key=ant-personal", "gw-claude")
    result = invoke("-m", "lb:cut", "hi")
    assert result.exit_code == 1
    assert result.stdout == "answer "  # shown once, not followed by another member's answer
    assert result.stderr.startswith(
        "Error: lb:cut: member 1 (claude-haiku-4.5, key: ant-personal): "
    )
    assert len(gateway.requests) == 0


def test_all_members_failing_keeps_the_last_error_as_the_cause(servers):
    import openai

    gateway, anthropic = servers
    anthropic.fail("500")
    gateway.fail("429")
    save_lb("down", "claude-haiku-4.5", "gw-claude")
    with pytest.raises(ValueError) as caught:
        llm.get_model("lb:down").prompt("hi").text()
    assert str(caught.value) == (
        "lb:down: all 2 members failed: claude-haiku-4.5: 500 server error; "
        "gw-claude: 429 rate limited"
    )
    assert isinstance(caught.value.__cause__, openai.RateLimitError)


# --- across processes ------------------------------------------------------------------------


def test_family_balancer_takes_turns_between_gateway_and_anthropic(servers):
    # (in this process: each prompt reads the rotation from the state file, as a new llm
    # process does; test_delegation.py checks that separate processes take turns)
    gateway, anthropic = servers
    save_lb("family", "gw-claude", "claude-haiku-4.5")
    outputs = []
    for _ in range(3):
        result = invoke("-m", "lb:family", "hi")
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout.strip())
    assert outputs == [
        "answer from gw with sk-gw",
        "answer from anthropic with sk-ant-default",
        "answer from gw with sk-gw",
    ]
    assert len(gateway.requests) == 2 and len(anthropic.requests) == 1
