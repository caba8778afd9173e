"""What a member can reach from the response it is given, and what an abandoned member leaves
behind (issue 8; found in review): nothing."""

import copy
import threading

import llm
import pytest
from conftest import invoke, last_logged, save_lb

from llm_loadbalancer.failures import MemberError, renamed
from llm_loadbalancer.view import MemberView

RELEASE = threading.Event()


class SlowWriter(llm.Model):
    """Writes everything a plugin may write onto its response, then waits for RELEASE before
    its first chunk: a member that misses the balancer's timeout after writing."""

    model_id = "slow-writer"
    can_stream = True

    def execute(self, prompt, stream, response, conversation=None):
        response.response_json = {"from": "slow-writer"}
        response.set_usage(input=1000, output=1000)
        response.add_tool_call(llm.ToolCall(name="llm_version", arguments={}, tool_call_id="x"))
        response.set_resolved_model("slow-writer-resolved")
        RELEASE.wait(30)
        yield "late answer"


class Plugin:
    __name__ = "lb-test-slow-writer"

    @llm.hookimpl
    def register_models(self, register):
        register(SlowWriter())


@pytest.fixture
def slow_writer():
    from llm.plugins import load_plugins, pm

    RELEASE.clear()
    load_plugins()
    pm.register(Plugin(), name="lb-test-slow-writer")
    yield
    RELEASE.set()
    pm.unregister(name="lb-test-slow-writer")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no-stream"])
def test_what_an_abandoned_member_wrote_before_its_deadline_never_reaches_the_log(
    slow_writer, stream
):
    save_lb("slow", "slow-writer", "echo", flags=("--timeout", "1"))
    result = invoke("-m", "lb:slow", *(() if stream else ("--no-stream",)), "hi")
    assert result.exit_code == 0, result.output
    RELEASE.set()
    for thread in threading.enumerate():
        if thread.name == "llm-loadbalancer member":
            thread.join(30)
    (row,) = last_logged(5)
    assert row["resolved_model"] == "echo"
    assert row["response_json"] is None or "slow-writer" not in str(row["response_json"])
    assert row["tool_calls"] == []
    assert (row["input_tokens"], row["output_tokens"]) != (1000, 1000)
    assert "late answer" not in row["response"]


def test_a_view_can_be_copied_and_printed_like_the_response():
    response = llm.get_model("echo").prompt("hi")
    view = MemberView(response, "member prompt", "member model")
    assert isinstance(view, llm.Response)
    assert (view.prompt, view.model) == ("member prompt", "member model")
    assert str(view) == str(response)
    copy.copy(view)  # no RecursionError


def test_a_held_view_writes_only_once_accepted():
    response = llm.get_model("echo").prompt("hi")
    view = MemberView(response, None, None, held=True)
    view.response_json = {"a": 1}
    view.set_usage(input=3, output=4)
    assert view.response_json == {"a": 1}  # the member reads back what it wrote
    assert response.response_json is None and response.input_tokens is None
    view.accept()
    assert response.response_json == {"a": 1} and response.input_tokens == 3
    view.detach()
    view.set_usage(input=9, output=9)
    assert response.input_tokens == 3


def test_a_renamed_error_keeps_its_type_and_attributes_where_it_can():
    refused = renamed(ConnectionRefusedError(111, "Connection refused"), "lb:x: member 1 (a): no")
    assert isinstance(refused, ConnectionRefusedError) and refused.errno == 111
    assert str(refused) == "lb:x: member 1 (a): no"
    # KeyError's str() quotes its message: it becomes a MemberError (the original is __cause__)
    assert isinstance(renamed(KeyError("k"), "lb:x: member 1 (a): 'k'"), MemberError)
