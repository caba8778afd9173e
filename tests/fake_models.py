"""Test-only models, registered in-process through llm's plugin manager."""

import json
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


class FakeModelsPlugin:
    __name__ = "lb-test-models"

    @llm.hookimpl
    def register_models(self, register):
        register(PlainSync())
        register(Strict(), StrictAsync())
