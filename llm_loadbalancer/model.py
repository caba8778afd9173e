"""The ``lb:NAME`` models that llm registers: capabilities, listing, and ``execute``.

Registration builds these for every model lookup, so this module imports nothing but llm:
what happens when a prompt runs is ``delegate.py``'s, imported on the first prompt. The sync
and async twins only drive the member's generator.
"""

from __future__ import annotations

import asyncio
import time

import llm


class _Shared:
    "Everything the sync and async lb models have in common; the twins add ``execute``."

    needs_key = None
    is_async = False

    def __init__(self, name: str, balancer, members, options_class, problem, missing=None):
        self.model_id = f"lb:{name}"
        self.balancer = balancer
        self.problem = problem  # why this balancer cannot answer, or None
        # one (model, async_model) per member, None for a member that is not installed; or
        # None when the balancer is broken
        self.members = members
        self.missing = missing or {}  # member index: why it is skipped (not installed)
        self._options_class = options_class  # a class, or a function that builds it
        if problem or not members:
            # it advertises nothing; _validate_attachments makes its own error the one shown
            self.can_stream = False
            self.supports_schema = self.supports_tools = self.supports_conversation = False
            self.attachment_types = frozenset()
            return
        present = [pair for pair in members if pair is not None]
        models = [self.chosen_model(pair) for pair in present]
        models = [m for m in models if m is not None] or [pair[1] for pair in present]
        self.can_stream = any(m.can_stream for m in models)
        self.supports_schema = all(m.supports_schema for m in models)
        self.supports_tools = all(m.supports_tools for m in models)
        self.supports_conversation = all(m.supports_conversation for m in models)
        types = set(models[0].attachment_types)
        for m in models[1:]:
            types &= set(m.attachment_types)
        self.attachment_types = frozenset(types)

    def chosen_model(self, pair):
        """The model a member answers with, of its (model, async_model): in an async prompt its
        async model, or its sync one, run in a thread (``drive.threaded_chunks``); None for a
        member with only an async model in a sync prompt."""
        return (pair[1] or pair[0]) if self.is_async else pair[0]

    @property
    def Options(self):
        "The options all members share, built the first time llm asks for them."
        if not isinstance(self._options_class, type):
            self._options_class = self._options_class()
        return self._options_class

    def __str__(self) -> str:
        kind = "LoadBalancer (async)" if self.is_async else "LoadBalancer"
        if self.problem:
            return f"{kind}: {self.model_id} (broken: {self.problem})"
        labels = ", ".join(
            m.label() + (" [not installed]" if i in self.missing else "")
            for i, m in enumerate(self.balancer.members)
        )
        return f"{kind}: {self.model_id} ({self.balancer.policy}: {labels})"

    def _validate_attachments(self, attachments=None):
        # llm calls this first when a prompt is made, before it checks any capability
        if self.problem:
            raise ValueError(f"{self.model_id}: {self.problem}")
        super()._validate_attachments(attachments)

    def get_key(self, explicit_key=None):
        # --key is passed through unchanged; each member resolves it (or uses its own key).
        return explicit_key


class LoadBalancerModel(_Shared, llm.KeyModel):
    def execute(self, prompt, stream, response, conversation=None, key=None):
        run = _run(self, prompt, conversation, key, stream)
        while (delay := run.wait()) is not None:
            time.sleep(delay)
        for attempt in run.attempts():
            try:
                for chunk in attempt.start(stream, response, conversation):
                    attempt.first_chunk = attempt.first_chunk or time.perf_counter()
                    yield chunk
            except Exception as ex:
                run.failed(attempt, ex, started=attempt.first_chunk is not None)
            else:
                run.succeeded(attempt, response)
                return
            finally:
                run.close(attempt)


class AsyncLoadBalancerModel(_Shared, llm.AsyncKeyModel):
    is_async = True

    async def execute(self, prompt, stream, response, conversation=None, key=None):
        run = _run(self, prompt, conversation, key, stream)
        while (delay := run.wait()) is not None:
            await asyncio.sleep(delay)
        for attempt in run.attempts():
            try:
                async for chunk in attempt.start(stream, response, conversation):
                    attempt.first_chunk = attempt.first_chunk or time.perf_counter()
                    yield chunk
            except Exception as ex:
                run.failed(attempt, ex, started=attempt.first_chunk is not None)
            else:
                run.succeeded(attempt, response)
                return
            finally:
                run.close(attempt)


_Run = None


def _run(lb, prompt, conversation, key, stream):
    """A prompt's ``delegate.Run``. delegate.py is imported on the first prompt, not with this
    module, which every model lookup imports; after that, a global's look-up (an import
    statement cost every prompt about 1 us)."""
    global _Run
    if _Run is None:
        from .delegate import Run

        _Run = Run
    return _Run(lb, prompt, conversation, key, stream)
