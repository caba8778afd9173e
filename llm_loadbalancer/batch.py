"""One batch to an embedding balancer: one prompt, as far as the balancer is concerned.

The member is chosen as for a prompt (``delegate.Run``: rotation and weights, cooldowns,
limits that count one request per batch, waiting up to max_wait), and its ``embed_batch`` is
driven by ``drive.py``: its SDK's retries off while another member can answer, and within the
balancer's timeout. Vectors are returned only when the whole batch is in, so a member that
fails half-way fails before any vector is returned, and the next member embeds the whole batch.
"""

from __future__ import annotations

import copy
import inspect
import time

import click

from . import drive
from .delegate import Attempt, LoadBalancerError, Run


class EmbeddingError(click.ClickException, LoadBalancerError):
    """A batch that no member embedded, or a balancer that cannot embed. ``llm embed`` and
    ``llm embed-multi`` do not catch a model's errors: as a ClickException it is one line,
    ``Error: lb:NAME: ...``, and exit 1; Python callers can catch it as a LoadBalancerError."""


class WrongCount(ValueError):
    "A member answered a batch with another number of vectors than the batch had items."


class _Unshared:
    """What ``drive.py`` accepts or detaches: an embedding member writes nothing but the vectors
    it returns, which are used only once all are in."""

    def accept(self) -> None:
        pass

    def detach(self) -> None:
        pass


class BatchAttempt(Attempt):
    "One member asked to embed one batch."

    def prepare(self) -> None:
        self.streamed = False  # timed as a whole, like a prompt without streaming

    def vectors(self, items: list, outer_key) -> list:
        "The member's vectors for every item of the batch; its error, if it fails."
        key = self.run.stored_key(self) if self.member.key else outer_key
        self.secret = key = self.model.get_key(key)
        vectors = list(
            drive.sync_chunks(
                _member_vectors(self.model, items, key),
                once=self.run.more_to_try(self.index),
                timeout=self.run.balancer.timeout,
                stream=False,
                view=_Unshared(),
            )
        )
        if len(vectors) != len(items):
            raise WrongCount(
                f"it returned {len(vectors)} vector{'' if len(vectors) == 1 else 's'} for a "
                f"batch of {len(items)} items"
            )
        return vectors


def _member_vectors(model, items: list, key):
    """The member's ``embed_batch``, called as llm calls it, on the first ``next()``: with
    ``key=`` where it takes one, else with the key set on a copy of the model (never on the
    registered one)."""
    try:
        inspect.signature(model.embed_batch).bind(items, key=key)
    except (TypeError, ValueError):
        model = copy.copy(model)
        model.key = key
        yield from model.embed_batch(items)
    else:
        yield from model.embed_batch(items, key=key)


class BatchRun(Run):
    "The decisions for one batch: a Run with no prompt, no conversation, nothing streamed."

    attempt_class = BatchAttempt

    def __init__(self, lb, key):
        super().__init__(lb, None, None, key, stream=False)

    def member_model(self, index: int):
        return self.lb.member_models()[index]

    def succeeded(self, attempt: BatchAttempt, vectors: list) -> None:
        "Record a success: its items, and its time."
        self._record(attempt, items=len(vectors), **attempt.timings())


def embed(lb, items, key) -> list:
    "Embed one batch with the balancer ``lb``: one vector per item, in order."
    items = list(items)
    if not items:  # llm asks for none when every item of a batch is stored already
        return []
    try:
        run = BatchRun(lb, key)
        while (delay := run.wait()) is not None:
            time.sleep(delay)
        for attempt in run.attempts():
            try:
                vectors = attempt.vectors(items, key)
            except Exception as ex:  # noqa: BLE001 (run.failed re-raises what is not failed over)
                run.failed(attempt, ex, started=False)
            else:
                run.succeeded(attempt, vectors)
                return vectors
            finally:
                run.close(attempt)
    except LoadBalancerError as ex:
        if isinstance(ex, EmbeddingError):
            raise
        raise EmbeddingError(str(ex)) from ex
