"""One prompt to a balancer: which members, in which order, with which options and key, and
what each member's failure means. The member's own ``execute`` is driven with the outer
response, so that everything it writes (chunks, stream events, usage, tool calls,
``response_json``) is the response's own.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import sys
import time

import llm

from . import affinity, drive, estimates, failures, model_options
from .config import Balancer, ConfigError, Member
from .members import build_options, load_stored_keys
from .policy import plan
from .speed import key_model, shallow_copy
from .store import Outcome, StateUnavailable, open_store, process_leases, warn_unavailable
from .view import MemberView

logger = logging.getLogger("llm_loadbalancer")
DEBUG_ENV = "LLM_LOADBALANCER_DEBUG"
RNG = random.Random()  # the random and lowest-latency policies' draws (tests seed their own)


class LoadBalancerError(ValueError):
    "A prompt-time problem with a balancer; llm shows it as one line, 'Error: lb:NAME: ...'."


def _debug_enabled() -> bool:
    if os.environ.get(DEBUG_ENV, "") in ("", "0"):
        return False
    if not getattr(logger, "_lb_handler", None):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("llm-loadbalancer: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger._lb_handler = handler
    return True


class Attempt:
    "One member asked to answer one prompt."

    def __init__(self, run: "Run", index: int):
        self.run = run
        self.index = index
        self.member: Member = run.balancer.members[index]
        self.model = run.member_model(index)
        self.secret = None
        self.ticket = None  # its request, counted when it was chosen (the store's own value)
        self.recorded = False
        self.streamed = True
        self.prepare()
        # (perf_counter, as where the first chunk is noted: time.monotonic is 15.6 ms steps on
        # Windows before Python 3.13, which would time every fast answer as 0)
        self.started = time.perf_counter()
        self.first_chunk: float | None = None  # when its first chunk came (perf_counter)

    @functools.cached_property
    def label(self) -> str:
        "How messages name it: ``member 2 (gpt-4o-mini, key: work)``."
        return self.member.describe(self.index + 1, self.run.keys)

    def prepare(self) -> None:
        "The member's own copy of the prompt, with its model and its options."
        self.prompt = shallow_copy(self.run.prompt)
        self.prompt.model = self.model
        self.prompt.options = self.run.member_options(self, self.model)

    def timings(self) -> dict:
        "Seconds from its start to its first chunk (None without one) and to now."
        first = self.first_chunk
        return {
            "first_chunk": None if first is None else first - self.started,
            "total": time.perf_counter() - self.started,
        }

    def start(self, stream, response, conversation):
        """The member's chunks (a sync or async generator), driven with its SDK's retries off
        while another member can answer, and within the balancer's timeout."""
        model = self.model
        stream = self.streamed = stream and model.can_stream
        response.set_resolved_model(model.model_id)
        timeout = self.run.balancer.timeout
        view = MemberView(response, self.prompt, model, held=timeout is not None)
        if not self.run.lb.is_async:
            chunks = drive.sync_chunks
        elif isinstance(model, (llm.AsyncModel, llm.AsyncKeyModel)):
            chunks = drive.async_chunks
        else:  # a member whose plugin has no async model, in an async prompt: in a thread
            chunks = drive.threaded_chunks
            conversation = sync_conversation(conversation)
        if key_model(model):
            if self.member.key:
                key = model.get_key(self.run.stored_key(self))
            else:
                key = model.get_key(self.run.outer_key)
            self.secret = key
            generator = model.execute(self.prompt, stream, view, conversation, key=key)
        else:
            if self.member.key and model.needs_key:
                model = copy.copy(model)
                model.key = self.secret = self.run.stored_key(self)
                view.model = self.prompt.model = model
            generator = model.execute(self.prompt, stream, view, conversation)
        return chunks(
            generator,
            once=self.run.more_to_try(self.index),
            timeout=timeout,
            stream=stream,
            view=view,
        )


def sync_conversation(conversation):
    """An async conversation as a sync member reads it: a sync ``llm.Conversation`` whose earlier
    responses are sync responses (all of them done), so that ``text()``, ``tool_calls()`` and
    ``usage()`` on them return values, not coroutines. None stays None."""
    if conversation is None or not isinstance(conversation, llm.AsyncConversation):
        return conversation
    found = conversation.to_sync_conversation()
    found.responses = [response._to_sync_response() for response in conversation.responses]
    found.loaded_messages = conversation.loaded_messages
    return found


class Run:
    """The decisions for one prompt to a balancer, shared by the sync and async models, which
    drive it: ``wait()`` until it returns None (sleeping what it says), then each of
    ``attempts()``, reporting ``failed`` or ``succeeded``. ``batch.py`` drives it for a batch
    of an embedding balancer, with no prompt and attempts of its own."""

    attempt_class = Attempt

    def __init__(self, lb, prompt, conversation, key, stream=True):
        if lb.problem:
            raise LoadBalancerError(f"{lb.model_id}: {lb.problem}")
        self.lb = lb
        self.balancer: Balancer = lb.balancer
        self.prompt = prompt
        self.outer_key = key
        self.stream = stream
        self.conversation_id = getattr(conversation, "id", None)
        # whether it continues a conversation (earlier turns, live or read back from llm's
        # logs): only then can the state hold a tie for it, which the choice then reads
        self.continues = bool(
            getattr(conversation, "responses", None)
            or getattr(conversation, "loaded_messages", None)
        )
        self.errors: list[str] = []
        self.last_error: Exception | None = None
        self.keys = load_stored_keys() if self.balancer.keyed else {}
        self.debug = _debug_enabled()
        self.use_state = True
        self.store = open_store(self.balancer)
        self.plan = self.ticket = None
        self.cooled = frozenset()  # members with a cooldown on record, as the choice read them
        # what the prompt asks of token limits (a batch of embeddings: not known)
        self.demand = None if prompt is None else estimates.Demand(prompt, self.output_cap)
        # the digest of its long prefix, when the balancer keeps prefixes on their member
        self.prefix = None
        self.home = None  # the prefix's member and when it last served it, as the choice read
        self.chosen_at = None
        if prompt is not None and self.balancer.affinity and not prompt.tool_results:
            self.prefix = affinity.prefix(prompt)
        self.waited_for = None  # the member the last wait was said to be for
        self.deadline: float | None = None  # when the prompt has waited max_wait
        self.merged: dict[int, dict] = {}  # member: its options (merged_options)
        for index, problem in lb.missing.items():
            print(
                f"Warning: {lb.model_id}: {problem}: skipped; install the plugin that provides "
                f"it, or remove the member with 'llm lb edit {self.balancer.name}'",
                file=sys.stderr,
            )

    def wait(self) -> float | None:
        """Choose the members for this prompt: None when chosen, or the seconds to sleep before
        asking again, because every member is at its limit or inside a reset its provider
        stated and the first to free up does so within the balancer's max_wait (one line on
        stderr says so). Longer than that, or once the prompt has waited max_wait in all, it
        fails."""
        unavailable = frozenset(self.lb.missing)
        try:
            # the time is the backend's (a Redis server's clock, for every machine alike)
            choice = self.store.choose(
                self.balancer,
                conversation=self.conversation_id if self.continues else None,
                tool_turn=bool(self.prompt and self.prompt.tool_results),
                unavailable=unavailable,
                stream=self.stream,
                rng=RNG,
                demand=self.demand,
                prefix=self.prefix,
            )
            self.plan, self.ticket, self.cooled, now, self.home = choice
            self.chosen_at = now
        except StateUnavailable as ex:
            now = time.time()
            warn_unavailable(ex)
            self.use_state = False
            count = len(self.balancer.members)
            slots = sum(self.balancer.weights or (1,) * count)  # the weighted cycle's length
            position = 0 if self.balancer.policy == "failover" else RNG.randrange(slots)
            self.plan = plan(
                self.balancer.policy,
                count,
                position,
                {},
                now,
                unavailable=unavailable,
                weights=self.balancer.weights,
                tiers=self.balancer.tiers,
                rng=RNG,
            )
        if self.plan.wait is None:
            self.order = self.plan.order[: None if self.balancer.failover else 1]
            return None
        when, index = self.plan.wait
        delay = max(when - now, 0.0)
        first = self.balancer.members[index].describe(index + 1, self.keys)
        if self.balancer.tiers is not None:
            first += f" of tier {self.balancer.members[index].tier}"
        max_wait = self.balancer.max_wait
        if self.deadline is None:
            self.deadline = now + max_wait
        if delay > max_wait:
            raise LoadBalancerError(
                f"{self.lb.model_id}: every member is at its limit or inside a reset its "
                f"provider stated; the first to free up is {first}, in {delay:.0f} s, longer than "
                f"max_wait ({max_wait:g} s; llm lb save --max-wait)"
            )
        if now + delay > self.deadline + 0.001:  # (prompts in flight that have not ended)
            raise LoadBalancerError(
                f"{self.lb.model_id}: every member is at its limit or inside a reset its "
                f"provider stated; waited max_wait ({max_wait:g} s; llm lb save --max-wait) "
                f"and {first} has no room yet"
            )
        if index != self.waited_for:  # (said once while it waits for the same member)
            self.waited_for = index
            print(
                f"{self.lb.model_id}: every member is at its limit; waiting {delay:.0f} s for "
                f"{first}",
                file=sys.stderr,
            )
        return delay

    def attempts(self):
        "Each member to try in turn; after the last failure, the error that lists them all."
        at_limit = []
        for number, index in enumerate(self.order):
            ticket = self.ticket if number == 0 else self._claim(index)
            if ticket is False:
                at_limit.append(index)
                continue
            try:
                attempt = self.attempt_class(self, index)
            except BaseException:  # (an option it refuses): what was counted for it ends
                if ticket is not None and self.use_state:
                    try:
                        self.store.finish(self.balancer, index, ticket)
                    except StateUnavailable:
                        pass
                raise
            attempt.ticket = ticket
            if ticket is not None and ticket.leased:  # (in flight, or tokens reserved)
                process_leases().hold(self.store, self.balancer, index, ticket)
            if self.debug:
                key = f"key: {attempt.member.key}" if attempt.member.key else "no key of its own"
                logger.info(
                    "%s: %s at position %d of %d, %s%s",
                    self.lb.model_id,
                    attempt.label,
                    index + 1,
                    len(self.balancer.members),
                    key,
                    f"; chosen: {self.plan.why}" if number == 0 else "",
                )
            yield attempt
        tried = len(self.errors)
        for index in at_limit:
            self.errors.append(f"{self.balancer.members[index].label()}: at its limit")
        for index in self.plan.skipped:
            self.errors.append(
                f"{self.balancer.members[index].label()}: skipped, cooling down after an error"
            )
        for index in self.lb.missing:
            self.errors.append(f"{self.balancer.members[index].label()}: not installed")
        count = len(self.balancer.members)
        head = (
            f"all {count} members failed"
            if tried == count
            else f"{tried} of {count} members failed"
        )
        raise LoadBalancerError(
            f"{self.lb.model_id}: {head}: {'; '.join(self.errors)}"
        ) from self.last_error

    def more_to_try(self, index: int) -> bool:
        "Whether another member would be tried if this one failed."
        return self.balancer.failover and index != self.order[-1]

    def member_model(self, index: int):
        if index in self.lb.missing:
            raise LoadBalancerError(f"{self.lb.model_id}: {self.lb.missing[index]}")
        model = self.lb.chosen_model(self.lb.members[index])
        if model is None:
            label = self.balancer.members[index].describe(index + 1)
            raise LoadBalancerError(
                f"{self.lb.model_id}: {label} has only an async model: "
                "run it with --async, or save the balancer without that member"
            )
        return model

    def merged_options(self, index: int, model) -> dict:
        """The member's model defaults, then its saved options, then those given at prompt time
        (worked out once a prompt: its estimate reads them too)."""
        found = self.merged.get(index)
        if found is not None:
            return found
        member = self.balancer.members[index]
        merged = self.merged[index] = model_options.defaults(model.model_id, self.balancer.user_dir)
        merged.update(member.options)
        if self.prompt.options.model_fields_set:  # options given at prompt time
            given = self.prompt.options.model_dump(exclude_unset=True)
            merged.update({name: value for name, value in given.items() if value is not None})
        return merged

    def output_cap(self, index: int) -> int | None:
        "The cap a member's options set on its answer (``estimates.output_cap``), or None."
        try:
            model = self.member_model(index)
        except LoadBalancerError:
            return None
        return estimates.output_cap(self.merged_options(index, model))

    def member_options(self, attempt: Attempt, model):
        "The member's options (``merged_options``), as its own Options class."
        merged = self.merged_options(attempt.index, model)
        try:
            return build_options(model.Options, merged)
        except ConfigError as ex:
            raise LoadBalancerError(f"{self.lb.model_id}: {attempt.label}: {ex}") from None

    def stored_key(self, attempt: Attempt) -> str:
        if attempt.member.key not in self.keys:
            # The name is not repeated: it may be a secret pasted into the file.
            raise LoadBalancerError(
                f"{self.lb.model_id}: {attempt.label}: its key is not the name of a stored key: "
                "store it with 'llm keys set NAME' and put key: NAME in the balancer "
                "('llm lb edit')"
            )
        return self.keys[attempt.member.key]

    def failed(self, attempt: Attempt, ex: Exception, started: bool) -> None:
        """Record a failed attempt. Unless another member should be tried, raise the member's
        error as ``lb:NAME: member N (...): <its message>``, from the original."""
        if isinstance(ex, LoadBalancerError):
            raise ex
        failure = failures.classify(ex, self.balancer.cooldown, self.balancer.quota_cooldown)
        secrets = [attempt.secret, self.outer_key]
        message = failures.one_line(ex, secrets=secrets)
        cooldown = failure.cooldown if failure.failover else None
        self._record(
            attempt,
            error=f"{failure.reason}: {message}",
            cooldown=cooldown,
            stated=failure.stated,
            exact=failure.exact,
            **attempt.timings(),
        )
        if started or not failure.failover or not self.balancer.failover:
            shown = failures.one_line(ex, secrets=secrets, limit=1000)
            raise failures.renamed(ex, f"{self.lb.model_id}: {attempt.label}: {shown}") from ex
        self.errors.append(f"{attempt.member.label()}: {failure.reason}")
        self.last_error = ex
        if self.debug:
            later = self.order[self.order.index(attempt.index) + 1 :]
            next_one = (
                f"trying {self.balancer.members[later[0]].describe(later[0] + 1, self.keys)}"
                if later
                else "no member left to try"
            )
            logger.info(
                "%s: %s failed (%s), %s", self.lb.model_id, attempt.label, failure.reason, next_one
            )

    def succeeded(self, attempt: Attempt, response) -> None:
        """Record a success: the tokens the member reported, its timings, the conversation tie
        where one will be needed (with sticky or affinity, or when the member made tool calls:
        their results go back to it), and the member as the home of the prompt's prefix."""
        tied = (
            self.balancer.sticky
            or self.balancer.affinity
            or getattr(response, "_tool_calls", True)
        )
        prefix = self.prefix
        if prefix and not affinity.refresh(self.home, attempt.index, self.chosen_at):
            prefix = None  # (its member served it again within a second: kept as it is)
        self._record(
            attempt,
            conversation=self.conversation_id if tied else None,
            prefix=prefix,
            tokens_in=response.input_tokens or 0,
            tokens_out=response.output_tokens or 0,
            **attempt.timings(),
        )

    def _claim(self, index: int):
        if not self.use_state:
            return None
        try:
            return self.store.claim(self.balancer, index, demand=self.demand)
        except StateUnavailable as ex:
            warn_unavailable(ex)
            self.use_state = False
            return None

    def close(self, attempt: Attempt) -> None:
        """After an attempt, however it ended. One that the caller stopped reading (or Ctrl-C)
        is no longer in flight; if its first chunk had come, it counts as answered."""
        if attempt.recorded:
            return
        self._release(attempt)
        if not self.use_state:
            return
        if attempt.first_chunk is not None:
            self._record(attempt, **attempt.timings())
        elif attempt.ticket is not None:
            attempt.recorded = True
            try:
                self.store.finish(self.balancer, attempt.index, attempt.ticket)
            except StateUnavailable:
                pass

    def _release(self, attempt: Attempt) -> None:
        "The prompt is no longer in flight: its lease is not renewed."
        if attempt.ticket is not None and attempt.ticket.leased:
            process_leases().release(attempt.ticket)

    def _record(self, attempt: Attempt, **outcome) -> None:
        attempt.recorded = True
        self._release(attempt)
        if not self.use_state:
            return
        outcome = Outcome(
            cooled=attempt.index in self.cooled, streamed=attempt.streamed, **outcome
        )
        try:
            self.store.record(self.balancer, attempt.index, outcome, ticket=attempt.ticket)
        except StateUnavailable as ex:
            warn_unavailable(ex)
