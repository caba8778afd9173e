"""The local test servers speak their protocols: the real llm-anthropic and llm's OpenAI
plugin, driven directly (not through lb: models) in this process, against
tests/local_anthropic.py and tests/local_openai.py, answer, stream, think, call tools and
meet each fault as the SDKs' own exceptions."""

import asyncio
import json
import os
import threading

import anthropic
import httpx2
import llm
import openai
import pytest
from conftest import invoke
from llm.parts import ReasoningPart

CHEAP = "claude-haiku-4.5"  # anthropic/claude-haiku-4-5-20251001
ANSWER = ["answer ", "from ", "anthropic ", "with ", "sk-ant-default"]


def sdk_client(server, **kwargs):
    "The anthropic SDK on its own, for what llm-anthropic never asks (it always streams)."
    return anthropic.Anthropic(api_key="sk-ant-sdk", base_url=server.base_url("sdk"), **kwargs)


def ask(client, **kwargs):
    messages = [{"role": "user", "content": "hello there"}]
    return client.messages.create(model="m", max_tokens=100, messages=messages, **kwargs)


class Background(threading.Thread):
    "Run a call in a thread; wait() gives its result or raises its exception."

    def __init__(self, call):
        super().__init__(daemon=True)
        self.call, self.result, self.error = call, None, None
        self.start()

    def run(self):
        try:
            self.result = self.call()
        except Exception as error:  # handed to the test by wait()
            self.error = error

    def wait(self, timeout=10):
        self.join(timeout)
        assert not self.is_alive(), "the call did not finish"
        if self.error:
            raise self.error
        return self.result


# --- llm-anthropic against local_anthropic ------------------------------------------------


def test_anthropic_streams_word_by_word_with_usage(local_anthropic):
    response = llm.get_model(CHEAP).prompt("hello there world")
    assert list(response) == ANSWER
    assert (response.usage().input, response.usage().output) == (3, 5)
    request = local_anthropic.requests[0]
    assert (request["path"], request["endpoint"], request["key"]) == (
        "/anthropic/v1/messages",
        "anthropic",
        "sk-ant-default",
    )
    body = request["body"]
    assert body["stream"] is True and body["model"] == "claude-haiku-4-5-20251001"
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}
    ]
    assert response.json()["stop_reason"] == "end_turn"


def test_anthropic_from_the_command_line(local_anthropic):
    # in the environment, so that `llm` processes started by a test reach the server too
    assert os.environ["ANTHROPIC_BASE_URL"] == local_anthropic.base_url("anthropic")
    result = invoke("-m", CHEAP, "-o", "thinking", "1", "--key", "ant-work", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "answer from anthropic with sk-ant-work"
    assert local_anthropic.seen("body")[0]["thinking"]["budget_tokens"] == 1024


def test_anthropic_keys_options_and_stream_false(local_anthropic):
    model = llm.get_model(CHEAP)
    response = model.prompt("hi", stream=False, key="sk-ant-work", temperature=0.2, max_tokens=50)
    assert response.text() == "answer from anthropic with sk-ant-work"
    body = local_anthropic.seen("body")[0]
    assert (body["temperature"], body["max_tokens"]) == (0.2, 50)
    assert body["stream"] is True  # llm-anthropic streams over HTTP even for stream=False


def test_anthropic_async_model_streams_and_meets_a_cut(local_anthropic):
    async def chunks():
        received = []
        try:
            async for chunk in llm.get_async_model(CHEAP).prompt("hi"):
                received.append(chunk)
        except httpx2.RemoteProtocolError:
            received.append("<cut>")
        return received

    assert asyncio.run(chunks()) == ANSWER
    local_anthropic.fail("cut")
    assert asyncio.run(chunks()) == ["answer ", "<cut>"]


def test_anthropic_non_streaming_json_message_through_the_sdk(local_anthropic):
    message = ask(sdk_client(local_anthropic), thinking={"type": "enabled", "budget_tokens": 1024})
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "thinking about it" and message.content[0].signature
    assert message.content[1].text == "answer from sdk with sk-ant-sdk"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (2, 5)
    assert local_anthropic.seen("body")[0].get("stream") is None


def test_anthropic_counts_tokens(local_anthropic):
    assert llm.get_model(CHEAP).count_tokens("one two three") == 3
    assert local_anthropic.seen("path") == ["/anthropic/v1/messages/count_tokens"]


@pytest.mark.parametrize(
    "model_id, options, thinking",
    [
        (CHEAP, {"thinking": True}, {"type": "enabled", "budget_tokens": 1024}),
        (
            "claude-sonnet-4.6",
            {"thinking_effort": "low"},
            {"type": "adaptive", "display": "summarized"},
        ),
    ],
)
def test_anthropic_thinking_reaches_the_server_and_reasoning_comes_back(
    local_anthropic, model_id, options, thinking
):
    response = llm.get_model(model_id).prompt("hi", max_tokens=2048, **options)
    assert response.text() == "answer from anthropic with sk-ant-default"
    body = local_anthropic.seen("body")[0]
    assert body["thinking"] == thinking
    assert (body["max_tokens"], body["temperature"]) == (2048, 1.0)
    if "thinking_effort" in options:
        assert body["output_config"] == {"effort": "low"}
    reasoning = [
        part
        for message in response.messages()
        for part in message.parts
        if isinstance(part, ReasoningPart)
    ]
    assert [part.text for part in reasoning] == ["thinking about it"]
    assert reasoning[0].provider_metadata["anthropic"]["signature"] == "sig-local-anthropic"


def test_anthropic_tool_call_round_trip(local_anthropic):
    def ping() -> str:
        "Answers pong."
        return "pong"

    chain = llm.get_model(CHEAP).chain("please CALL_TOOL", tools=[ping])
    assert chain.text().strip() == "tool said pong via anthropic with sk-ant-default"
    first, second = local_anthropic.seen("body")
    assert first["tools"][0]["name"] == "ping"
    call, result = second["messages"][-2:]
    assert call["role"] == "assistant" and call["content"][-1]["type"] == "tool_use"
    assert call["content"][-1]["id"] == "toolu_anthropic_1"
    assert result["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_anthropic_1", "content": "pong"}
    ]


@pytest.mark.parametrize(
    "fault, error",
    [
        ("400", anthropic.BadRequestError),
        ("401", anthropic.AuthenticationError),
        ("403", anthropic.PermissionDeniedError),
        ("404", anthropic.NotFoundError),
        ("500", anthropic.InternalServerError),
        ("529", anthropic.OverloadedError),
    ],
)
def test_anthropic_http_faults_are_the_sdks_exceptions_once(local_anthropic, fault, error):
    local_anthropic.fail(fault)
    with pytest.raises(error) as info:
        llm.get_model(CHEAP).prompt("hi").text()
    assert info.value.status_code == int(fault)
    assert info.value.body["type"] == "error"
    assert local_anthropic.seen("endpoint") == ["anthropic"]  # x-should-retry: false


def test_anthropic_rate_limit_carries_retry_after(local_anthropic):
    local_anthropic.fail("429:7", key="sk-ant-work", times=1)
    model = llm.get_model(CHEAP)
    with pytest.raises(anthropic.RateLimitError) as info:
        model.prompt("hi", key="sk-ant-work").text()
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert model.prompt("hi", key="sk-ant-work").text().endswith("sk-ant-work")  # times=1


def test_anthropic_a_key_can_carry_its_fault(local_anthropic):
    with pytest.raises(anthropic.InternalServerError):
        llm.get_model(CHEAP).prompt("hi", key="fail-500").text()


def test_anthropic_close_is_a_connection_error_the_sdk_retries(local_anthropic):
    local_anthropic.fail("close")
    with pytest.raises(anthropic.APIConnectionError):
        ask(sdk_client(local_anthropic, max_retries=0))
    assert len(local_anthropic.requests) == 1
    # llm-anthropic keeps the SDK's retries: the first request is closed, the retry answered
    local_anthropic.heal()
    local_anthropic.fail("close", times=1)
    assert llm.get_model(CHEAP).prompt("hi").text() == "answer from anthropic with sk-ant-default"
    assert local_anthropic.seen("endpoint") == ["sdk", "anthropic", "anthropic"]


def test_anthropic_cut_stream_fails_after_the_first_chunk(local_anthropic):
    local_anthropic.fail("cut")
    chunks = []
    # The anthropic SDK does not wrap errors met while reading a stream: httpx2's own
    with pytest.raises(httpx2.RemoteProtocolError):
        for chunk in llm.get_model(CHEAP).prompt("hi"):
            chunks.append(chunk)
    assert chunks == ["answer "]
    assert len(local_anthropic.requests) == 1


def test_anthropic_cut_without_streaming_is_a_connection_error(local_anthropic):
    local_anthropic.fail("cut")
    with pytest.raises(anthropic.APIConnectionError):
        ask(sdk_client(local_anthropic, max_retries=0))


def test_anthropic_malformed_is_a_json_decode_error(local_anthropic):
    local_anthropic.fail("malformed")
    with pytest.raises(json.JSONDecodeError):
        llm.get_model(CHEAP).prompt("hi").text()  # a stream
    with pytest.raises(json.JSONDecodeError):
        ask(sdk_client(local_anthropic))  # one JSON body
    assert local_anthropic.seen("endpoint") == ["anthropic", "sdk"]  # neither retried


def test_anthropic_hang_until_release(local_anthropic):
    local_anthropic.fail("hang", times=1)
    call = Background(lambda: llm.get_model(CHEAP).prompt("hi").text())
    assert local_anthropic.wait_hung(1)
    assert call.is_alive() and not local_anthropic.released_and_answered.is_set()
    local_anthropic.release()
    assert call.wait() == "answer from anthropic with sk-ant-default"
    assert local_anthropic.wait_released(1)
    assert local_anthropic.released_and_answered.is_set()
    assert (local_anthropic.hung, local_anthropic.released_answers) == (0, 1)


def test_anthropic_late_answer_after_the_client_gave_up(local_anthropic):
    local_anthropic.fail("hang")
    with pytest.raises(anthropic.APITimeoutError):
        ask(sdk_client(local_anthropic, max_retries=0, timeout=0.2))
    assert local_anthropic.wait_hung(1)  # held all along
    local_anthropic.release()
    assert local_anthropic.wait_released(1)  # written, or found the client gone
    assert local_anthropic.hung == 0


def test_anthropic_stall_holds_the_rest_of_the_stream_until_release(local_anthropic):
    local_anthropic.fail("stall", times=1)
    chunks = iter(llm.get_model(CHEAP).prompt("hi"))
    assert next(chunks) == "answer "
    assert local_anthropic.wait_hung(1)  # the rest is held until release: this came first
    local_anthropic.release()
    assert list(chunks) == ANSWER[1:]
    assert local_anthropic.wait_released(1)
    assert (local_anthropic.hung, local_anthropic.released_answers) == (0, 1)


def test_stop_ends_hung_requests_without_an_answer():
    from local_anthropic import LocalAnthropic

    server = LocalAnthropic().start()
    server.fail("hang")
    call = Background(lambda: ask(sdk_client(server, max_retries=0)))
    assert server.wait_hung(1)
    server.stop()
    with pytest.raises(anthropic.APIConnectionError):
        call.wait()
    assert server.released_answers == 0


# --- llm's OpenAI plugin against local_openai: the new faults -------------------------------


def test_openai_404_is_not_found(local_openai):
    local_openai.fail("404", endpoint="a")
    with pytest.raises(openai.NotFoundError) as info:
        llm.get_model("local-a").prompt("hi").text()
    assert info.value.status_code == 404
    assert llm.get_model("local-b").prompt("hi").text() == "answer from b with sk-b"


@pytest.mark.parametrize("stream", [True, False])
def test_openai_malformed_is_a_json_decode_error(local_openai, stream):
    local_openai.fail("malformed")
    with pytest.raises(json.JSONDecodeError):
        llm.get_model("local-a").prompt("hi", stream=stream).text()
    assert len(local_openai.requests) == 1
    assert local_openai.seen("body")[0]["stream"] is stream


def test_openai_cut_stream_is_a_connection_error(local_openai):
    local_openai.fail("cut")
    chunks = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in llm.get_model("local-a").prompt("hi"):
            chunks.append(chunk)
    assert chunks == ["answer "]


def test_openai_hang_until_release(local_openai):
    local_openai.fail("hang", endpoint="a")
    model = llm.get_model("local-a")
    calls = [Background(lambda: model.prompt("hi").text()) for _ in range(2)]
    assert local_openai.wait_hung(2)
    # hang holds only what it was told to: b answers meanwhile
    assert llm.get_model("local-b").prompt("hi").text() == "answer from b with sk-b"
    local_openai.release()
    assert [call.wait() for call in calls] == ["answer from a with sk-a"] * 2
    assert local_openai.wait_released(2)
    assert local_openai.released_answers == 2
    # the rule still holds: the next request to a hangs until the next release
    late = Background(lambda: model.prompt("hi", stream=False).text())
    assert local_openai.wait_hung(1)
    local_openai.release()
    assert late.wait() == "answer from a with sk-a"


def test_openai_stall_holds_the_rest_of_the_stream_until_release(local_openai):
    local_openai.fail("stall", endpoint="a")
    chunks = iter(llm.get_model("local-a").prompt("hi"))
    assert next(chunks) == "answer "
    assert local_openai.wait_hung(1)
    local_openai.release()
    assert "".join(chunks) == "from a with sk-a"
    assert local_openai.wait_released(1)
    # stopping the server cuts a stream it still holds
    late = iter(llm.get_model("local-a").prompt("hi"))
    assert next(late) == "answer "
    assert local_openai.wait_hung(1)
    local_openai.stop()
    with pytest.raises(openai.APIConnectionError):
        list(late)
    assert local_openai.released_answers == 1


def test_both_servers_in_one_test(local_openai, local_anthropic):
    assert llm.get_model("local-a").prompt("hi").text() == "answer from a with sk-a"
    assert llm.get_model(CHEAP).prompt("hi", key="sk-ant-personal").text() == (
        "answer from anthropic with sk-ant-personal"
    )
    assert llm.get_model(CHEAP).prompt("hi", key="ant-work").text().endswith("sk-ant-work")
