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

Every key of a balancer starts with ``llm-lb:<digest>:``, the digest of its name and member
list: two definitions under one name never share a rotation or a limit. Keys expire after
``rules.KEEP_DAYS`` without use. redis-py is imported only here, when a balancer uses Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
from pathlib import Path

from ..config import Balancer, shown_url
from ..limits import WINDOWS
from ..selection import choose, counted_ahead, free_at, of_kind
from . import Busy, Choice, Outcome, Unreachable, rules, timeout

CONNECT_TIMEOUT = 0.25  # seconds to connect, at most
TIMEOUT = 0.5  # seconds for one reply, at most
KEEP = int(rules.KEEP_DAYS * rules.DAY)  # seconds a balancer's keys are kept without use
# A cooldown is stored only if the one on record is still the one it was escalated from; each
# try that finds another means another process recorded one in between
RECORD_TRIES = 50
LUA = Path(__file__).with_name("lua")


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
        self.host = socket.gethostname()
        self.read = self.client.register_script(script("read", "snapshot"))
        self.commit = self.client.register_script(script("commit", "snapshot", "lib"))
        self.recorder = self.client.register_script(script("record", "snapshot", "lib"))
        self.finisher = self.client.register_script(script("finish", "lib"))
        # prefix: (the last snapshot this process received, when, by time.monotonic())
        self.snapshots: dict = {}

    def call(self, function, *args, **kwargs):
        "A call to the server; its failures are ``Unreachable``."
        try:
            return function(*args, **kwargs)
        except self.errors as ex:
            raise Unreachable(f"{shown_url(self.url)}: {type(ex).__name__}: {ex}") from ex

    @staticmethod
    def prefix(balancer: Balancer) -> str:
        digest = hashlib.sha256(f"{balancer.name}\n{balancer.signature}".encode()).hexdigest()
        return f"llm-lb:{digest[:24]}:"

    # --- choosing -----------------------------------------------------------------------------

    def _want(self, balancer, conversation=None, only=None, now=None) -> tuple[str, list[int]]:
        """What snapshot() reads for a choice (JSON): in flight and timings as the policy needs
        them, the window totals of the members with limits (or of ``only``), at ``now`` (None:
        the server's time); and those members."""
        policy = balancer.policy
        want = {
            "members": len(balancer.members),
            "flight": policy == "least-busy",
            "timings": policy == "lowest-latency",
            "limited": [],
        }
        if conversation:
            want["conversation"] = conversation
        if now is not None:
            want["now"] = f"{now:.6f}"
        included = []
        for index, member in enumerate(balancer.members):
            if member.limits and (only is None or index == only):
                included.append(index)
                tokens = bool(of_kind(member.limits, "t"))
                want["limited"].append([index, _windows(member), tokens])
        return json.dumps(want), included

    def _speculates(self, balancer, conversation) -> bool:
        """Whether a choice may start from the snapshot this process last received, instead of
        a read: when it needs no conversation tie (which differs from prompt to prompt) and no
        member has limits (whose window totals are taken at the snapshot's time). The time is
        then the snapshot's, plus what passed since on this machine's monotonic clock. (Saves
        a round trip per prompt: half of what Redis adds.)"""
        return not conversation and not any(member.limits for member in balancer.members)

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
    ) -> Choice:
        prefix = self.prefix(balancer)
        asks_tie = conversation if conversation and (tool_turn or balancer.sticky) else None
        want, included = self._want(balancer, asks_tie, now=now)
        speculates = self._speculates(balancer, asks_tie)
        raw = self.snapshots.get(prefix) if speculates else None
        overtaken = _Overtaken(self.url, "choice")
        while True:
            if raw is None:
                raw = (self.call(self.read, args=[prefix, want]), time.monotonic())
            snapshot = _ServerSnapshot(self, balancer, raw, included, now)
            if balancer.policy == "lowest-latency":
                snapshot.latency = snapshot.latencies(stream)
            plan = choose(
                balancer,
                snapshot,
                tool_turn=tool_turn,
                unavailable=unavailable,
                rng=rng,
                now=snapshot.now,
            )
            first = plan.order[0] if plan.order else None
            counted = first is not None and counted_ahead(balancer, first)
            moved = plan.position != snapshot.position
            if not moved and not counted:  # nothing to store: the read was the choice
                return Choice(plan, None, snapshot.cooled, snapshot.now)
            reply = self._commit(
                balancer,
                snapshot.version,
                want,
                position=plan.position if moved else None,
                member=first if counted else None,
                now=snapshot.now,
            )
            if reply[0] == 1:
                if speculates:
                    self.snapshots[prefix] = (reply[2], time.monotonic())
                return Choice(plan, reply[1] or None, snapshot.cooled, snapshot.now)
            raw = overtaken.again(reply[1])

    def _commit(self, balancer, version, want, *, position=None, member=None, now):
        """Store a choice made from the snapshot of ``version``: [1, its ticket ('' without),
        the snapshot after it], or [0, a new snapshot] when the version moved since."""
        choice = {
            "version": version,
            "flight": balancer.policy == "least-busy",
            "host": self.host,
            "pid": os.getpid(),
            "now": f"{now:.6f}",
            "keep": KEEP,
            "stale": rules.IN_FLIGHT_HOURS * 3600,
        }
        if position is not None:
            choice["position"] = position
        if member is not None:
            choice["member"] = member
        return self.call(self.commit, args=[self.prefix(balancer), json.dumps(choice), want])

    def claim(self, balancer: Balancer, member: int, now: float | None = None):
        prefix = self.prefix(balancer)
        want, included = self._want(balancer, only=member, now=now)
        overtaken = _Overtaken(self.url, "claim")
        raw = None
        while True:
            if raw is None:
                raw = (self.call(self.read, args=[prefix, want]), time.monotonic())
            snapshot = _ServerSnapshot(self, balancer, raw, included, now)
            if (
                member in snapshot.blocked
                or free_at(balancer, snapshot, member, snapshot.now) is not None
            ):
                return None
            reply = self._commit(balancer, snapshot.version, want, member=member, now=snapshot.now)
            if reply[0] == 1:
                return reply[1]
            raw = overtaken.again(reply[1])

    # --- recording ----------------------------------------------------------------------------

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        self.call(self.finisher, args=[self.prefix(balancer), ticket, KEEP])

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        fields = {
            "member": member,
            "cooled": outcome.cooled,
            "stated": outcome.stated,
            "tokens_in": int(outcome.tokens_in),
            "tokens_out": int(outcome.tokens_out),
            "items": int(outcome.items),
            "streamed": outcome.streamed,
            "counts_tokens": bool(of_kind(balancer.members[member].limits, "t")),
            "keep": KEEP,
            "timings_kept": rules.RECENT,
        }
        if outcome.error is not None:
            fields["error"] = outcome.error
        if outcome.conversation:
            fields["conversation"] = outcome.conversation
        for name in ("first_chunk", "total"):
            if getattr(outcome, name) is not None:
                fields[name] = f"{getattr(outcome, name):.6f}"
        if ticket is not None:
            fields["ticket"] = ticket
        if now is not None:
            fields["now"] = f"{now:.6f}"
        args = [self.prefix(balancer), None]
        speculates = self._speculates(balancer, None)
        if speculates:
            args.append(self._want(balancer, now=now)[0])
        on_record = ""  # the member's cooldown as the script finds it; none, most often
        for _ in range(RECORD_TRIES):
            if outcome.cooldown:
                previous = float(on_record.split("|")[2]) if on_record else None
                fields["cooldown"] = rules.next_cooldown(outcome.cooldown, previous)
                fields["expect"] = on_record
            args[1] = json.dumps(fields)
            reply = self.call(self.recorder, args=args)
            if reply[0] == 1:
                break
            on_record = reply[1]  # another cooldown is on record: escalate from that one
        else:
            raise Busy(
                f"{shown_url(self.url)}: too busy: every record of a cooldown was overtaken by "
                f"another process's, {RECORD_TRIES} times"
            )
        if speculates:
            self.snapshots[args[0]] = (reply[1], time.monotonic())

    def reset(self, balancer: Balancer) -> None:
        prefix = self.prefix(balancer)
        keys = [prefix + name for name in ("version", "rotation", "cooldowns", "stats", "ties")]
        # (not "ids": a ticket handed out before the reset must never be handed out again)
        keys += [prefix + name for name in ("ties_at", "flight", "flight_at")]
        for index in range(len(balancer.members)):
            keys += [prefix + f"{kind}:{index}" for kind in ("requests", "spent", "timings")]
        self.call(self.client.delete, *keys)

    # --- looking ------------------------------------------------------------------------------

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        prefix = self.prefix(balancer)
        pipe = self.client.pipeline(transaction=True)
        pipe.time()
        pipe.hgetall(prefix + "stats")
        pipe.hgetall(prefix + "cooldowns")
        for index in range(len(balancer.members)):
            pipe.lrange(prefix + f"timings:{index}", 0, -1)
            pipe.zrangebyscore(prefix + f"requests:{index}", "-inf", "+inf", withscores=True)
            pipe.zrangebyscore(prefix + f"spent:{index}", "-inf", "+inf", withscores=True)
        server_time, counters, cooldowns, *per_member = self.call(pipe.execute)
        now = server_time[0] + server_time[1] / 1e6 if now is None else now
        rows, cooling, events, timings = {}, {}, {}, {}
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
                until, _, _, reason = row.split("|", 3)
                if float(until) > now:
                    cooling[index] = (float(until), reason)
            recent, requests, spent = per_member[3 * index : 3 * index + 3]
            timings[index] = [
                (timing[1], timing[2]) for timing in map(_timing, recent) if timing[2]
            ]
            if member.limits:
                events[index] = (
                    [(at, 0) for _, at in requests if at > now - rules.DAY],
                    [(at, int(entry.split(":")[1])) for entry, at in spent if at > now - rules.DAY],
                )
        return rules.shape_stats(balancer, rows, cooling, events, timings, now)

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
        requests = sum(int(v) for k, v in counters.items() if k.endswith(":requests"))
        return {
            "redis_version": info.get("redis_version"),
            "round_trip": trip,
            "prefix": prefix,
            "known": bool(exists),  # (the name llm lb state --json has always given it)
            "position": int(position or 0),
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
    "What the server knew at one read (``selection.Snapshot``)."

    def __init__(self, store: RedisStore, balancer: Balancer, raw, included: list[int], now):
        (version, position, cooldowns, tie, flight, timings, totals, server_now), arrived = raw
        self.store, self.balancer = store, balancer
        self.version = version
        self.position = int(position)
        # the server's time, moved on by what passed since the snapshot came (``now``: a test's)
        self.now = float(server_now) + (time.monotonic() - arrived) if now is None else now
        rows = []
        for index, row in zip(cooldowns[::2], cooldowns[1::2]):
            until, stated, _, _ = row.split("|", 3)
            rows.append((int(index), float(until), stated == "1"))
        self.cooling, self.blocked, self.cooled = rules.read_cooldowns(rows, self.now)
        self.tie = tuple(int(x) for x in tie.split("|")[:2]) if tie else None
        self.busy = None
        if balancer.policy == "least-busy":
            entries = []
            for value in flight[1::2]:
                member, host, pid, at = value.split("|")
                entries.append((int(member), float(at), (host == store.host, int(pid))))
            self.busy = rules.in_flight(entries, self.now, _alive)
        self.timings = [[_timing(entry) for entry in member] for member in timings]
        self.latency = None
        self._totals = {}
        numbers = iter(int(value) for value in totals)
        for index in included:
            windows = _windows(balancer.members[index])
            self._totals[index] = {window: (next(numbers), next(numbers)) for window in windows}

    def latencies(self, stream: bool) -> dict[int, float]:
        found = {}
        for index, timings in enumerate(self.timings):
            median = rules.median_latency(timings, self.now, stream)
            if median is not None:
                found[index] = median
        return found

    def totals(self, member: int) -> dict[float, tuple[int, int]]:
        return self._totals[member]

    def events(self, member: int, since: float):
        prefix = self.store.prefix(self.balancer)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.zrangebyscore(prefix + f"requests:{member}", f"({since:.6f}", "+inf", withscores=True)
        pipe.zrangebyscore(prefix + f"spent:{member}", f"({since:.6f}", "+inf", withscores=True)
        requests, spent = self.store.call(pipe.execute)
        return (
            [(at, 0) for _, at in requests],
            [(at, int(entry.split(":")[1])) for entry, at in spent],
        )


def _alive(process) -> bool:
    "A prompt in flight on another machine counts until it is old; on this one, while it runs."
    local, pid = process
    return rules.alive(pid) if local else True


def _windows(member) -> list[float]:
    "The windows of a member's limits, in seconds, shortest first."
    return sorted({WINDOWS[name] for name in member.limits})
