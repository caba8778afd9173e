"""Test-only models, registered in-process through llm's plugin manager."""

import json
import threading
from types import SimpleNamespace
from typing import Optional

import llm
from pydantic import Field, field_validator


def _report(model, prompt, stream, key=None):
    return json.dumps(
        {
            "model": model.model_id,
            "prompt": prompt.prompt,
            "system": prompt.system,
            "stream": stream,
            "schema": prompt.schema,
            "options": prompt.options.model_dump(exclude_none=True),
            "key": key,
        }
    )


class PlainSync(llm.Model):
    "A sync-only model that cannot stream but supports schemas."

    model_id = "plain-sync"
    can_stream = False
    supports_schema = True

    class Options(llm.Options):
        temperature: Optional[float] = Field(default=None, description="Temperature")

    def execute(self, prompt, stream, response, conversation=None):
        yield _report(self, prompt, stream)


# what sync-stream did, in order: the thread it ran in, "finished" (asked for more after its
# last chunk), "closed" (its generator ended, or was closed)
SYNC_EVENTS: list = []
GATE = threading.Event()  # what sync-stream waits for, where its options say (the test sets it)


class SyncStream(llm.Model):
    """A sync-only model that streams, as many local-model plugins are (no async twin): "one ",
    then "two"; usage 3 in, 5 out; a tool call with tool=true. wait=before / wait=after: it
    waits for GATE before its first chunk / between its chunks. recall=true: first, the text
    of each earlier response of the conversation, read as a sync plugin reads it
    (``prev.text()``). broken_close=true: its clean-up fails when it is closed early."""

    model_id = "sync-stream"
    can_stream = True
    supports_tools = True

    class Options(llm.Options):
        wait: Optional[str] = Field(default=None, description="before or after its first chunk")
        tool: Optional[bool] = Field(default=None, description="Call a tool")
        recall: Optional[bool] = Field(default=None, description="Repeat the earlier answers")
        broken_close: Optional[bool] = Field(default=None, description="Fail when closed")

    def execute(self, prompt, stream, response, conversation=None):
        SYNC_EVENTS.append(threading.current_thread().name)
        try:
            if prompt.options.recall and conversation is not None:
                for earlier in conversation.responses:
                    yield f"[{earlier.text()}] "
            if prompt.options.wait == "before":
                GATE.wait(60)  # (a bound for a broken test; the test sets the gate)
            yield "one "
            if prompt.options.wait == "after":
                GATE.wait(60)
            yield "two"
            response.set_usage(input=3, output=5)
            if prompt.options.tool:
                response.add_tool_call(llm.ToolCall(name="lookup", arguments={"q": "x"}))
            SYNC_EVENTS.append("finished")
        except GeneratorExit:
            if prompt.options.broken_close:
                raise RuntimeError("its clean-up failed")
            raise
        finally:
            SYNC_EVENTS.append("closed")


class _StrictShared:
    model_id = "strict"
    can_stream = True
    supports_schema = True

    class Options(llm.Options):
        temperature: Optional[float] = Field(default=None, description="Temperature")
        seed: Optional[int] = Field(default=None, description="Seed")

        @field_validator("temperature")
        @classmethod
        def at_most_one(cls, value):
            if value is not None and value > 1.0:
                raise ValueError("temperature must be at most 1.0")
            return value


class Strict(_StrictShared, llm.Model):
    def execute(self, prompt, stream, response, conversation=None):
        yield "strict: "
        yield _report(self, prompt, stream)


class StrictAsync(_StrictShared, llm.AsyncModel):
    async def execute(self, prompt, stream, response, conversation=None):
        yield "strict: "
        yield _report(self, prompt, stream)


CALLS: list = []  # the name of each flaky member called, in order


class FlakyError(Exception):
    "Shaped like an HTTP client's error: status_code, and a response with headers."

    def __init__(self, status, retry_after=None):
        super().__init__(f"Error code: {status} - simulated failure")
        self.status_code = status
        headers = {"retry-after": retry_after} if retry_after else {}
        self.response = SimpleNamespace(status_code=status, headers=headers)


class _FlakyShared:
    """Fails as its options say: fail=429, 429:RETRY_AFTER, 500, 401, 400, refused,
    missing-key, leak (an error whose text holds the key, as an HTTP client's can), or cut
    (an error after the first chunk); name= identifies the member. It takes a key like an
    API model: a stored key, or LB_TEST_FLAKY_KEY (which the fixture sets)."""

    model_id = "flaky"
    can_stream = True
    needs_key = "flaky"
    key_env_var = "LB_TEST_FLAKY_KEY"

    class Options(llm.Options):
        name: Optional[str] = Field(default=None, description="Name in the answer")
        fail: Optional[str] = Field(default=None, description="How to fail")

    def chunks(self, prompt, key):
        name, fail = prompt.options.name, prompt.options.fail
        CALLS.append(name)
        if fail == "leak":
            raise ValueError(f"Illegal header value b'Bearer {key}'")
        if fail == "refused":
            raise ConnectionRefusedError(111, "Connection refused")
        if fail == "missing-key":
            raise llm.NeedsKeyException("No key found")
        if fail == "cut":
            yield f"first chunk from {name} "
            raise FlakyError(500)
        if fail:
            status, _, retry_after = fail.partition(":")
            raise FlakyError(int(status), retry_after or None)
        yield f"answer from {name}"


class Flaky(_FlakyShared, llm.KeyModel):
    def execute(self, prompt, stream, response, conversation=None, key=None):
        yield from self.chunks(prompt, key)


class FlakyAsync(_FlakyShared, llm.AsyncKeyModel):
    async def execute(self, prompt, stream, response, conversation=None, key=None):
        for chunk in self.chunks(prompt, key):
            yield chunk


class FakeModelsPlugin:
    __name__ = "lb-test-models"

    @llm.hookimpl
    def register_models(self, register):
        register(PlainSync())
        register(SyncStream())
        register(Strict(), StrictAsync())
        register(Flaky(), FlakyAsync())
