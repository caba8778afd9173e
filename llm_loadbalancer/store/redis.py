"""The state of balancers kept in a Redis server, shared by every machine that uses it
(``store.Store``).

A choice is two round trips: one script (``lua/read.lua``) reads everything the choice needs,
and the server's clock (every machine uses the server's time, so their own clocks need not
agree); Python chooses (``selection.choose``); a second script (``lua/commit.lua``) stores the
choice only if nothing changed since the read (its ``version``). When something did, another
process chose in between, and the choice is made again from the fresh snapshot that came with
the refusal. Recording an outcome is one script (``lua/record.lua``); a failure's cooldown is
escalated in Python (``rules.next_cooldown``) from the cooldown the script finds on record,
and stored only if that is still the one on record.

Every key starts with ``llm-lb:2:`` (2: the format of the keys; a server whose
``llm-lb:format`` is newer is left for the local file, with a warning to upgrade). A balancer's
keys then carry the digest of its name and member list (two definitions under one name never
share a rotation or statistics); a provider's bucket's (``b:``, a model and a stored key), the
digest of those: its requests and tokens counted against limits, and the limits members
declared for it, and the tokens reserved by prompts in flight, shared by every balancer.
Keys expire after ``rules.KEEP_DAYS`` without use.
Whatever the server answers is checked as it is read: anything malformed is ``Malformed``, which
is treated like a server that cannot be reached. redis-py is imported only here, when a
balancer uses Redis.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import time
from pathlib import Path

from typing import NamedTuple

from ..config import Balancer, shown_url
from ..config import cut as config_cut
from .. import affinity, limits
from ..selection import by_affinity, choose, counted_ahead, free_at, limited, need_of
from . import Busy, Choice, Outcome, Route, Unreachable, rules, timeout

CONNECT_TIMEOUT = 0.25  # seconds to connect, at most
TIMEOUT = 0.5  # seconds for one reply, at most
KEEP = int(rules.KEEP_DAYS * rules.DAY)  # seconds a balancer's keys are kept without use
# A cooldown is stored only if the one on record is still the one it was escalated from; each
# try that finds another means another process recorded one in between
RECORD_TRIES = 50
LUA = Path(__file__).with_name("lua")
FORMAT = 2  # the format of the keys (their names start with llm-lb:2:)
BASE = f"llm-lb:{FORMAT}:"
# What a malformed value raises as it is parsed
MALFORMED = (ValueError, TypeError, AttributeError, IndexError, KeyError, StopIteration)


class Malformed(Unreachable):
    "The server holds (or answered with) something this code cannot read."


class Ticket(NamedTuple):
    """A request counted when it was chosen: its id, whether the tokens it reports count
    against its bucket's limits, whether it is in flight (least-busy), the tokens it reserved
    in its bucket (None: no reservation) and its input's estimate."""

    id: str
    tokens: bool
    flight: bool
    reserved: int | None = None
    estimate: int | None = None
    probe: bool = False  # the member's probe after its cooldown (``rules.PROBING``)

    @property
    def leased(self) -> bool:
        "Whether it holds something while it runs (in flight, a reservation, a probe): a lease."
        return self.flight or self.reserved is not None or self.probe


def script(name: str, *library: str) -> str:
    "A script of ``lua/``, after the library files whose functions it calls."
    return "\n".join((LUA / f"{part}.lua").read_text("utf-8") for part in (*library, name))


class RedisStore:
    "The state of the balancers that name one Redis server, through one connection."

    def __init__(self, url: str, password: str | None = None):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise Unreachable(
                "redis-py is not installed: pip install 'llm-loadbalancer[redis]' "
                "(or llm install 'llm-loadbalancer[redis]')"
            ) from None
        self.url = url
        self.errors = (redis.exceptions.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url,
            password=password,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # a server that fails is left for this process
            decode_responses=True,
        )
        self.read = self.client.register_script(script("read", "snapshot"))
        self.commit = self.client.register_script(script("commit", "snapshot", "lib"))
        self.recorder = self.client.register_script(script("record", "snapshot", "lib"))
        self.finisher = self.client.register_script(script("finish", "lib"))
        # prefix: (the last snapshot this process received, when, by time.monotonic())
        self.snapshots: dict = {}
        # the balancers (their prefixes) whose buckets have limits declared, seen in a snapshot
        self.declared: set[str] = set()
        self.name = url

    def call(self, function, *args, **kwargs):
        "A call to the server; its failures are ``Unreachable``."
        try:
            return function(*args, **kwargs)
        except self.errors as ex:
            if "llm-lb: newer format" in str(ex):
                raise Unreachable(
                    f"{shown_url(self.url)}: it holds the state in a newer format, of a newer "
                    "llm-loadbalancer: upgrade llm-loadbalancer on this machine"
                ) from ex
            raise Unreachable(f"{shown_url(self.url)}: {type(ex).__name__}: {ex}") from ex
        except MALFORMED as ex:  # redis-py could not read what the server answered
            raise Malformed(
                f"{shown_url(self.url)}: its answers are not a Redis server's "
                f"({type(ex).__name__}: {config_cut(str(ex))})"
            ) from ex

    def malformed(self, ex: Exception, balancer: Balancer) -> Malformed:
        "What the server held that could not be read, as the warning says it."
        if isinstance(ex, _InBucket):  # a provider's bucket's: shared, and kept by a reset
            hint = f"delete the keys {ex.prefix}* (a key's limits, shared by every balancer)"
        else:
            hint = f"'llm lb reset {balancer.name}' clears it"
        return Malformed(
            f"{shown_url(self.url)}: unexpected data for {balancer.model_id} "
            f"({type(ex).__name__}: {config_cut(str(ex))}); {hint}"
        )

    @staticmethod
    def prefix(balancer: Balancer) -> str:
        return _definition(balancer.name, balancer.signature)

    @staticmethod
    def bucket(member) -> str:
        "The key prefix of a member's provider's bucket."
        return _bucket(rules.bucket(member))

    # --- choosing -----------------------------------------------------------------------------

    def _want(self, balancer, conversation=None, now=None, prefix=None) -> str:
        """What snapshot() reads for a choice (JSON): in flight and timings as the policy needs
        them, each member's bucket, at ``now`` (None: the server's time)."""
        policy = balancer.policy
        want = {
            "format": FORMAT,
            "members": len(balancer.members),
            "flight": policy == "least-busy",
            "timings": policy == "lowest-latency",
            "buckets": [[self.bucket(m), bool(m.limits)] for m in balancer.members],
            "reports": rules.RECENT_REPORTS,
        }
        if conversation:
            want["conversation"] = conversation
        if prefix:
            want["prefix"] = affinity.TAG + prefix
        if now is not None:
            want["now"] = f"{now:.6f}"
        return json.dumps(want)

    def _speculates(self, balancer, conversation) -> bool:
        """Whether a choice may start from the snapshot this process last received, instead of
        a read: when it needs no conversation tie (which differs from prompt to prompt) and no
        member has limits, of its own or declared for its bucket by another balancer (window
        totals are taken at the snapshot's time). The time is then the snapshot's, plus what
        passed since on this machine's monotonic clock. (Saves a round trip per prompt: half of
        what Redis adds.)"""
        return (
            not conversation
            and not any(member.limits for member in balancer.members)
            and self.prefix(balancer) not in self.declared
        )

    def _snapshot(self, balancer, raw, now) -> _ServerSnapshot:
        try:
            snapshot = _ServerSnapshot(self, balancer, raw, now)
        except MALFORMED as ex:
            raise self.malformed(ex, balancer) from ex
        if snapshot.any_declared:
            self.declared.add(self.prefix(balancer))
        return snapshot

    def choose(
        self,
        balancer: Balancer,
        *,
        conversation: str | None = None,
        tool_turn: bool = False,
        unavailable: frozenset[int] = frozenset(),
        stream: bool = True,
        rng=None,
        now: float | None = None,
        demand=None,
        prefix: str | None = None,
    ) -> Choice:
        digest = prefix if balancer.affinity else None
        prefix = self.prefix(balancer)
        sticks = tool_turn or balancer.sticky or balancer.affinity
        asks_tie = conversation if conversation and sticks else None
        want = self._want(balancer, asks_tie, now=now, prefix=digest)
        speculates = self._speculates(balancer, asks_tie or digest)
        raw = self.snapshots.get(prefix) if speculates else None
        cached = raw is not None  # (a choice stored from it is checked; one that is not, read)
        overtaken = _Overtaken(self.url, "choice")
        while True:
            if raw is None:
                raw = (self.call(self.read, args=[prefix, want]), time.monotonic())
            snapshot = self._snapshot(balancer, raw, now)
            if balancer.policy == "lowest-latency":
                snapshot.latency = snapshot.latencies(stream)
            plan = choose(
                balancer,
                snapshot,
                tool_turn=tool_turn,
                unavailable=unavailable,
                rng=rng,
                now=snapshot.now,
                demand=demand,
                prefix=digest,
            )
            first = plan.order[0] if plan.order else None
            counted = first is not None and (snapshot.counted(first) or first in snapshot.due)
            if first in snapshot.due:
                plan = plan._replace(why=f"{plan.why}, its probe after a cooldown")
            moved = plan.position != snapshot.position
            if by_affinity(plan):  # (a count, which no choice depends on: no version check)
                self.call(self.client.hincrby, prefix + "stats", "affinity:routed", 1)
            if not moved and not counted and not snapshot.redated:
                if cached:  # another process may have changed what it says since: read it
                    raw, cached = None, False
                    continue
                # (the read was the choice)
                return Choice(plan, None, snapshot.cooled, snapshot.now, snapshot.home)
            need = need_of(snapshot, first, demand) if counted else None
            reply = self._commit(
                balancer,
                snapshot,
                want,
                position=plan.position if moved else None,
                member=first if counted else None,
                need=need,
            )
            if reply[0] == 1:
                if speculates:
                    self.snapshots[prefix] = (reply[2], time.monotonic())
                ticket = snapshot.ticket(first, reply[1], need) if counted else None
                return Choice(plan, ticket, snapshot.cooled, snapshot.now, snapshot.home)
            raw, cached = overtaken.again(reply[1]), False

    def route(
        self, balancer: Balancer, *, unavailable=frozenset(), now=None, demand=None, prefix=None
    ) -> Route:
        digest = prefix if balancer.affinity else None
        want = self._want(balancer, now=now, prefix=digest)
        raw = (self.call(self.read, args=[self.prefix(balancer), want]), time.monotonic())
        snapshot = self._snapshot(balancer, raw, now)
        if balancer.policy == "lowest-latency":
            snapshot.latency = snapshot.latencies(True)
        plan = choose(
            balancer,
            snapshot,
            unavailable=unavailable,
            now=snapshot.now,
            demand=demand,
            prefix=digest,
        )
        if plan.order and plan.order[0] in snapshot.due:
            plan = plan._replace(why=f"{plan.why}, its probe after a cooldown")
        try:
            free = limited(balancer, snapshot, snapshot.now, demand)
        except MALFORMED as ex:
            raise self.malformed(ex, balancer) from ex
        return Route(plan, free, snapshot.cooling, snapshot.blocked, snapshot.now)

    def _commit(self, balancer, snapshot, want, *, position=None, member=None, need=None):
        """Store a choice made from ``snapshot``: [1, its ticket ('' without), the snapshot after
        it], or [0, a new snapshot] when a version moved since."""
        now = snapshot.now
        choice = {
            "version": snapshot.version,
            "buckets": snapshot.bucket_versions,
            "format": FORMAT,
            "now": f"{now:.6f}",
            "keep": KEEP,
            "stale": rules.IN_FLIGHT_HOURS * 3600,
        }
        if position is not None:
            choice["position"] = position
        if snapshot.redated:
            choice["redate"] = snapshot.redate_fields()
        if member is not None:
            choice["member"] = member
            own = balancer.members[member]
            if member in snapshot.due:  # its probe: the only prompt sent to it until it ends
                field = snapshot.fields[member]
                _, _, length, reason = field.split("|", 3)
                probing = f"{now + rules.LEASE:.6f}|{rules.PROBING}|{length}|"
                choice["probe"] = [field, probing + rules.probe_reason(reason)]
            if snapshot.limits(member):
                choice["bucket"] = self.bucket(own)
                if own.limits and not snapshot.declares(member):
                    source = f"{self.prefix(balancer)}#{member}"
                    choice["declare"] = [source, _declaration(own, now)]
                if need is not None:
                    choice["reserve"] = f"{need.tokens}|{int(need.blind)}|{now + rules.LEASE:.6f}"
            if balancer.policy == "least-busy":
                choice["flight"] = f"{now + rules.LEASE:.6f}|{now:.6f}"
        reply = self.call(self.commit, args=[self.prefix(balancer), json.dumps(choice), want])
        if not isinstance(reply, list) or len(reply) < 2 or reply[0] not in (0, 1):
            raise self.malformed(ValueError(f"a reply of {type(reply).__name__}"), balancer)
        return reply

    def claim(self, balancer: Balancer, member: int, now: float | None = None, demand=None):
        prefix = self.prefix(balancer)
        want = self._want(balancer, now=now)
        overtaken = _Overtaken(self.url, "claim")
        raw = None
        while True:
            if raw is None:
                raw = (self.call(self.read, args=[prefix, want]), time.monotonic())
            snapshot = self._snapshot(balancer, raw, now)
            if (
                member in snapshot.blocked
                or free_at(balancer, snapshot, member, snapshot.now, demand) is not None
            ):
                return False
            if not snapshot.counted(member) and member not in snapshot.due:
                return None
            need = need_of(snapshot, member, demand)
            reply = self._commit(balancer, snapshot, want, member=member, need=need)
            if reply[0] == 1:
                return snapshot.ticket(member, reply[1], need)
            raw = overtaken.again(reply[1])

    # --- recording ----------------------------------------------------------------------------

    def _held(self, balancer: Balancer, member: int, ticket) -> list:
        "finish.lua's first arguments: the prompt's ticket, and the bucket of its reservation."
        bucket = self.bucket(balancer.members[member]) if ticket.reserved is not None else ""
        return [self.prefix(balancer), ticket.id, KEEP, bucket]

    @staticmethod
    def _probed(member: int, ticket) -> str:
        "finish.lua's last argument: the member whose probe this is, or ''."
        return str(member) if ticket.probe else ""

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        if ticket.leased:
            when = "" if now is None else f"{now:.6f}"
            args = [*self._held(balancer, member, ticket), "", when, self._probed(member, ticket)]
            self.call(self.finisher, args=args)

    def renew(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        if ticket.leased:
            args = [*self._held(balancer, member, ticket), rules.LEASE]
            args += ["" if now is None else f"{now:.6f}", self._probed(member, ticket)]
            self.call(self.finisher, args=args)

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        own = balancer.members[member]
        fields = {
            "member": member,
            "cooled": outcome.cooled,
            "stated": outcome.stated,
            "tokens_in": int(outcome.tokens_in),
            "tokens_out": int(outcome.tokens_out),
            "items": int(outcome.items),
            "streamed": outcome.streamed,
            "keep": KEEP,
            "timings_kept": rules.RECENT,
        }
        spent, estimate, output = rules.spent(outcome, ticket)
        if spent > 0 and rules.counts_tokens(own.limits, ticket):
            fields["bucket"] = self.bucket(own)
            fields["spent"] = spent
            fields["detail"] = ":" + ("" if estimate is None else str(estimate)) + ":" + (
                "" if output is None else str(output)
            )
        if ticket is not None and ticket.reserved is not None:
            fields["bucket"] = self.bucket(own)
            fields["reservation"] = ticket.id
        if getattr(ticket, "probe", False):
            fields["probe"] = True
        if outcome.error is not None:
            fields["error"] = outcome.error
        if outcome.conversation:
            fields["conversation"] = outcome.conversation
        if outcome.prefix:
            fields["prefix"] = affinity.TAG + outcome.prefix
            fields["affinity"] = balancer.affinity
        for name in ("first_chunk", "total"):
            if getattr(outcome, name) is not None:
                fields[name] = f"{getattr(outcome, name):.6f}"
        if ticket is not None and ticket.flight:
            fields["ticket"] = ticket.id
        if now is not None:
            fields["now"] = f"{now:.6f}"
        args = [self.prefix(balancer), None]
        speculates = self._speculates(balancer, None)
        if speculates:
            args.append(self._want(balancer, now=now))
        on_record = ""  # the member's cooldown as the script finds it; none, most often
        for _ in range(RECORD_TRIES):
            if outcome.cooldown:
                try:
                    previous = float(on_record.split("|")[2]) if on_record else None
                except MALFORMED as ex:
                    raise self.malformed(ex, balancer) from ex
                fields["cooldown"] = rules.next_cooldown(outcome.cooldown, previous, outcome.exact)
                fields["expect"] = on_record
            args[1] = json.dumps(fields)
            reply = self.call(self.recorder, args=args)
            if not isinstance(reply, list) or len(reply) < 2:
                raise self.malformed(ValueError(f"a reply of {type(reply).__name__}"), balancer)
            if reply[0] == 1:
                break
            on_record = reply[1]  # another cooldown is on record: escalate from that one
            if not isinstance(on_record, str):
                raise self.malformed(ValueError("a cooldown that is not text"), balancer)
        else:
            raise Busy(
                f"{shown_url(self.url)}: too busy: every record of a cooldown was overtaken by "
                f"another process's, {RECORD_TRIES} times"
            )
        if speculates:
            self.snapshots[args[0]] = (reply[1], time.monotonic())

    def _keys(self, balancer: Balancer) -> list[str]:
        "A definition's keys (not its buckets': they belong to the keys of the providers)."
        prefix = self.prefix(balancer)
        keys = [prefix + name for name in ("version", "rotation", "cooldowns", "stats", "ties")]
        keys += [prefix + name for name in ("ties_at", "flight", "flight_at")]
        keys += [prefix + name for name in ("prefixes", "prefixes_at")]
        keys += [prefix + f"timings:{index}" for index in range(len(balancer.members))]
        return keys

    def reset(self, balancer: Balancer) -> None:
        self.call(self.client.delete, *self._keys(balancer))
        self.snapshots.pop(self.prefix(balancer), None)

    def retire(self, balancer: Balancer) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*self._keys(balancer))
        for index, member in enumerate(balancer.members):
            pipe.hdel(self.bucket(member) + "limits", f"{self.prefix(balancer)}#{index}")
        self.call(pipe.execute)

    def declare(self, balancer: Balancer, now: float | None = None) -> None:
        pipe = self.client.pipeline(transaction=True)
        if now is None:
            seconds, micros = self.call(self.client.time)
            now = seconds + micros / 1e6
        for index, member in enumerate(balancer.members):
            if member.limits:
                bucket = self.bucket(member)
                source = f"{self.prefix(balancer)}#{index}"
                pipe.hset(bucket + "limits", source, _declaration(member, now))
                pipe.expire(bucket + "limits", KEEP)
                pipe.incr(bucket + "version")
                pipe.expire(bucket + "version", KEEP)
        self.call(pipe.execute)

    # --- looking ------------------------------------------------------------------------------

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        try:
            return self._stats(balancer, now)
        except MALFORMED as ex:
            raise self.malformed(ex, balancer) from ex

    def _stats(self, balancer: Balancer, now: float | None) -> list[dict]:
        prefix = self.prefix(balancer)
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(prefix + "stats")
        pipe.hgetall(prefix + "cooldowns")
        for index, member in enumerate(balancer.members):
            bucket = self.bucket(member)
            pipe.lrange(prefix + f"timings:{index}", 0, -1)
            pipe.zrangebyscore(bucket + "requests", "-inf", "+inf", withscores=True)
            pipe.zrangebyscore(bucket + "spent", "-inf", "+inf", withscores=True)
            pipe.hgetall(bucket + "limits")
            pipe.hgetall(bucket + "reserved")
        server_time, counters, cooldowns, *per_member = self.call(pipe.execute)
        now = server_time[0] + server_time[1] / 1e6 if now is None else now
        rows, events, timings, on_record, applied, reservations = {}, {}, {}, [], {}, {}
        for index, member in enumerate(balancer.members):
            got = {name: counters.get(f"{index}:{name}") for name in _COUNTERS}
            if got["requests"] is not None:
                rows[index] = (
                    int(got["requests"]),
                    int(got["successes"] or 0),
                    int(got["failures"] or 0),
                    float(got["last_used"]) if got["last_used"] else None,
                    got["last_error"],
                    int(got["input_tokens"] or 0),
                    int(got["output_tokens"] or 0),
                    int(got["items"] or 0),
                )
            row = cooldowns.get(str(index))
            if row:
                until, stated, length, reason = row.split("|", 3)
                on_record.append((index, float(until), _stated(stated), float(length), reason))
            recent, requests, spent, declared, reserved = per_member[5 * index : 5 * index + 5]
            timings[index] = [
                (timing[1], timing[2]) for timing in map(_timing, recent) if timing[2]
            ]
            sources = _sources(declared.items())
            applied[index] = rules.strictest(member.limits, sources.values(), now)
            if applied[index]:
                events[index] = _events(requests, spent, now - rules.DAY)
                reservations[index] = rules.reserved(_reservations(reserved.items()), now)
        cooling = rules.cooling_now(on_record, now)
        return rules.shape_stats(
            balancer, rows, cooling, events, timings, now, applied, reservations
        )

    def affinity(self, balancer: Balancer, now: float | None = None) -> dict:
        prefix = self.prefix(balancer)
        if now is None:
            seconds, micros = self.call(self.client.time)
            now = seconds + micros / 1e6
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(prefix + "stats", "affinity:routed")
        pipe.zcount(prefix + "prefixes_at", f"{now - balancer.affinity:.6f}", "+inf")
        routed, held = self.call(pipe.execute)
        try:
            return {"routed": int(routed or 0), "prefixes": int(held)}
        except MALFORMED as ex:
            raise self.malformed(ex, balancer) from ex

    def report(self, balancer: Balancer) -> dict:
        "The server's version and round trip (seconds), and what it holds for this definition."
        self.call(self.client.ping)  # connects
        started = time.perf_counter()
        self.call(self.client.ping)
        trip = time.perf_counter() - started
        info = self.call(self.client.info, "server")
        prefix = self.prefix(balancer)
        pipe = self.client.pipeline(transaction=True)
        pipe.exists(prefix + "version")
        pipe.hget(prefix + "rotation", "position")
        pipe.hgetall(prefix + "stats")
        pipe.hlen(prefix + "cooldowns")
        exists, position, counters, cooldowns = self.call(pipe.execute)
        try:
            requests = sum(int(v) for k, v in counters.items() if k.endswith(":requests"))
            position = int(position or 0)
        except MALFORMED as ex:
            raise self.malformed(ex, balancer) from ex
        return {
            "redis_version": info.get("redis_version"),
            "round_trip": trip,
            "prefix": prefix,
            "known": bool(exists),  # (the name llm lb state --json has always given it)
            "position": position,
            "requests": requests,
            "cooldowns": cooldowns,
        }


_COUNTERS = (
    "requests",
    "successes",
    "failures",
    "last_used",
    "last_error",
    "input_tokens",
    "output_tokens",
    "items",
)


def _timing(entry: str):
    "(at, first chunk, total, streamed) from a stored 'at|first|total|streamed'."
    at, first, total, streamed = entry.split("|")
    return (
        float(at),
        float(first) if first else None,
        float(total) if total else None,
        streamed == "1",
    )


class _Overtaken:
    """What to do when another process stored its choice between this one's snapshot and its
    store (or the snapshot kept from this process's last prompt was not the latest): the first
    time, choose again at once from the fresh snapshot that came with the refusal; after that,
    after a short random pause (growing to 50 ms), from a new read; for as long as the state
    file would wait for its lock (LLM_LOADBALANCER_STATE_TIMEOUT), then ``Busy``: the prompt is
    chosen without the shared state, with a warning."""

    def __init__(self, url: str, what: str):
        self.url, self.what, self.times = url, what, 0
        self.limit = timeout()
        self.deadline = time.monotonic() + self.limit

    def again(self, snapshot):
        "The snapshot to choose from next ((reply, when it came), or None: read again)."
        self.times += 1
        if self.times == 1:
            return (snapshot, time.monotonic())
        if time.monotonic() > self.deadline:
            raise Busy(
                f"{shown_url(self.url)}: too busy: every {self.what} was overtaken by another "
                f"process's for {self.limit:g} s"
            )
        time.sleep(random.uniform(0, min(0.0005 * 2**self.times, 0.05)))
        return None


class _ServerSnapshot:
    """What the server knew at one read (``selection.Snapshot``), every value checked as it is
    parsed (a malformed one raises one of MALFORMED)."""

    def __init__(self, store: RedisStore, balancer: Balancer, raw, now):
        read, arrived = raw
        version, position, cooldowns, tie, flight, timings, buckets, server_now, home = read
        self.store, self.balancer = store, balancer
        self.version = _text(version)
        self.position = int(position)
        # the server's time, moved on by what passed since the snapshot came (``now``: a test's)
        self.now = float(server_now) + (time.monotonic() - arrived) if now is None else now
        rows, self.fields = [], {}
        for index, row in zip(cooldowns[::2], cooldowns[1::2]):
            until, stated, length, _ = row.split("|", 3)
            self.fields[int(index)] = row
            rows.append((int(index), float(until), _stated(stated), float(length)))
        self.cooling, self.blocked, self.cooled, self.redated = rules.read_cooldowns(
            rows, self.now
        )
        self.due = rules.due(self.cooling, self.blocked, self.cooled)
        self.tie = self.home = None
        if tie:
            first, last = (int(x) for x in _text(tie).split("|")[:2])
            self.tie = (first, last)
        if home:
            _, last, at = _text(home).split("|")[:3]
            self.home = (int(last), float(at))
            if not math.isfinite(self.home[1]):
                raise ValueError(f"a prefix's tie dated {at}")
        self.busy = None
        if balancer.policy == "least-busy":
            entries = []
            for value in flight[1::2]:
                member, lease, at = value.split("|")
                entries.append((int(member), float(at), float(lease)))
            self.busy = rules.in_flight(entries, self.now)
        self.timings = [[_timing(entry) for entry in member] for member in timings]
        self.latency = None
        self.needs: dict = {}
        if len(buckets) != len(balancer.members):
            raise ValueError(f"{len(buckets)} buckets for {len(balancer.members)} members")
        self.bucket_versions, self._limits, self._totals, self._declared = {}, {}, {}, {}
        self._reserved, self._history = {}, {}
        self.any_declared = False
        for index, (member, found) in enumerate(zip(balancer.members, buckets)):
            try:
                self._bucket(index, member, found)
            except MALFORMED as ex:
                raise _InBucket(store.bucket(member), ex) from ex

    def _bucket(self, index: int, member, found) -> None:
        "What the snapshot read of a member's bucket: its version, declarations and totals."
        bucket_version, declared, totals, reserved, reports = found
        self.bucket_versions[self.store.bucket(member)] = _text(bucket_version)
        sources = _sources(zip(declared[::2], declared[1::2]))
        self.any_declared = self.any_declared or bool(sources)
        self._declared[index] = sources
        self._limits[index] = rules.strictest(member.limits, sources.values(), self.now)
        counts = [int(value) for value in totals]
        if self._limits[index]:
            if len(counts) != 4:
                raise ValueError(f"{len(counts)} window totals")
            self._totals[index] = {60.0: tuple(counts[:2]), 86400.0: tuple(counts[2:])}
            pairs = zip(reserved[::2], reserved[1::2])
            self._reserved[index] = rules.reserved(_reservations(pairs), self.now)
            found = [(float(at), *_report(entry)) for entry, at in zip(reports[::2], reports[1::2])]
            self._history[index] = rules.history(found, self.now)

    def limits(self, member: int) -> dict:
        return self._limits[member]

    def totals(self, member: int, exact: bool = False) -> dict[float, tuple[int, int]]:
        return self._totals[member]

    def reserved(self, member: int) -> limits.Reserved:
        return self._reserved.get(member, limits.NOTHING)

    def history(self, member: int):
        return self._history[member]

    def declares(self, member: int) -> bool:
        "Whether the member's own declaration is on record, and recent."
        own = self._declared[member].get(f"{self.store.prefix(self.balancer)}#{member}")
        return own is not None and rules.declared_lately(own[4], self.now)

    def counted(self, member: int) -> bool:
        "Whether a request of the member is counted when chosen (``selection.counted_ahead``)."
        return counted_ahead(self.balancer, self, member)

    def ticket(self, member: int, ticket_id, need=None) -> Ticket:
        tokens = rules.counts_tokens(self._limits[member])
        flight = self.balancer.policy == "least-busy"
        probe = member in self.due
        if need is None:
            return Ticket(_text(ticket_id), tokens, flight, probe=probe)
        return Ticket(_text(ticket_id), tokens, flight, need.tokens, need.input, probe)

    def redate_fields(self) -> list:
        "[member, the field read, the field with the corrected end] of each cooldown to redate."
        found = []
        for member, until in self.redated.items():
            field = self.fields[member]
            found.append([member, field, f"{until:.6f}|{field.split('|', 1)[1]}"])
        return found

    def latencies(self, stream: bool) -> dict[int, float]:
        found = {}
        for index, timings in enumerate(self.timings):
            median = rules.median_latency(timings, self.now, stream)
            if median is not None:
                found[index] = median
        return found

    def events(self, member: int, since: float):
        bucket = self.store.bucket(self.balancer.members[member])
        pipe = self.store.client.pipeline(transaction=True)
        pipe.zrangebyscore(bucket + "requests", f"({since:.6f}", "+inf", withscores=True)
        pipe.zrangebyscore(bucket + "spent", f"({since:.6f}", "+inf", withscores=True)
        requests, spent = self.store.call(pipe.execute)
        try:
            return _events(requests, spent, since)
        except MALFORMED as ex:
            raise self.store.malformed(ex, self.balancer) from ex


class _InBucket(ValueError):
    "A provider's bucket's value that cannot be read."

    def __init__(self, prefix: str, problem: Exception):
        super().__init__(f"{type(problem).__name__}: {problem}")
        self.prefix = prefix


def _events(requests, spent, since: float):
    "(time, 0) of each request and (time, tokens) of each report since then, from the sets."
    return (
        [(float(at), 0) for _, at in requests if float(at) > since],
        [(float(at), int(entry.split(":")[1])) for entry, at in spent if float(at) > since],
    )


def _stated(value: str) -> int:
    "A cooldown's kind on record: 0 guessed, 1 stated by the provider, 2 a probe's."
    kind = int(value)
    if kind not in (0, 1, rules.PROBING):
        raise ValueError(f"a cooldown of kind {value}")
    return kind


def _reservations(pairs) -> list[tuple]:
    "(tokens, blind, at, lease) of a bucket's ``reserved`` hash, from its (field, value)s."
    found = []
    for _, value in pairs:
        tokens, blind, at, lease = _text(value).split("|")
        found.append((int(tokens), blind == "1", float(at), float(lease)))
    return found


def _report(entry: str) -> tuple:
    """(tokens, estimate, output) of an entry of a bucket's ``spent`` set: 'cum:tokens' (an
    older version's), or 'cum:tokens:estimate:output'."""
    _, tokens, *detail = _text(entry).split(":")
    estimate, output = detail if detail else ("", "")
    return int(tokens), int(estimate) if estimate else None, int(output) if output else None


def _sources(pairs) -> dict:
    "{source: (rpm, rpd, tpm, tpd, at)} of a bucket's ``limits`` hash, from its (field, value)s."
    sources = {}
    for source, value in pairs:
        *numbers, at = value.split("|")
        if len(numbers) != 4:
            raise ValueError(f"a declaration of {len(numbers)} limits")
        sources[_text(source)] = (*(int(n) if n else None for n in numbers), float(at))
    return sources


def _declaration(member, now: float) -> str:
    "How a bucket's ``limits`` hash keeps a member's declaration: 'rpm|rpd|tpm|tpd|at'."
    values = rules.declaration(member.limits)
    return "|".join("" if value is None else str(value) for value in values) + f"|{now:.6f}"


def _text(value) -> str:
    "A value the server gave as text; anything else is malformed."
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__} where text was expected")
    return value


@functools.lru_cache(maxsize=64)
def _definition(name: str, signature: str) -> str:
    digest = hashlib.sha256(f"{name}\n{signature}".encode()).hexdigest()
    return f"{BASE}{digest[:24]}:"


@functools.lru_cache(maxsize=256)
def _bucket(bucket: str) -> str:
    return f"{BASE}b:{hashlib.sha256(bucket.encode()).hexdigest()[:24]}:"
