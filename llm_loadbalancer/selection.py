"""Choosing the members for one prompt from what a state backend knows: the one decision both
backends (the SQLite file, a Redis server) share. No I/O of its own: the backend reads, inside
its transaction (SQLite) or snapshot (Redis), what ``Known`` asks for, and stores the result.
"""

from __future__ import annotations

import math
from typing import Protocol

from . import limits
from .config import Balancer
from .policy import Plan, plan


class Known(Protocol):
    "What a backend knows about a balancer at one moment."

    position: int  # the rotation position
    cooling: dict[int, float]  # {member: until} cooling down after a guessed time
    blocked: dict[int, float]  # {member: until} inside a provider's Retry-After
    tie: tuple[int, int] | None  # the conversation's (first, last) member, where asked for
    busy: dict[int, int] | None  # least-busy: prompts in flight per member
    latency: dict[int, float] | None  # lowest-latency: recent median per member

    def totals(self, member: int) -> dict[float, tuple[int, int]]:
        "{window seconds: (requests, tokens)} of the member in each window of its limits, now."

    def events(self, member: int, since: float) -> tuple[list, list]:
        "(time, 0) of each request and (time, tokens) of each report of the member since then."


def choose(
    balancer: Balancer,
    known: Known,
    *,
    tool_turn: bool = False,
    unavailable: frozenset[int] = frozenset(),
    rng=None,
    now: float,
) -> Plan:
    """The order of members for one prompt and the next rotation position. Only the member
    chosen first has its limits looked at (the others, if the prompt fails over to them, when
    they are claimed): one at a limit is left out, and the choice made again."""
    pinned = preferred = None
    if known.tie is not None:
        if tool_turn:
            pinned = known.tie[1]
        elif balancer.sticky:
            preferred = known.tie[0]
    blocked = dict(known.blocked)
    checked = set()
    while True:
        result = plan(
            balancer.policy,
            len(balancer.members),
            known.position,
            known.cooling,
            now,
            pinned=pinned,
            preferred=preferred,
            unavailable=unavailable,
            weights=balancer.weights,
            blocked=blocked,
            busy=known.busy,
            latency=known.latency,
            rng=rng,
        )
        first = result.order[0] if result.order else None
        if first is None or first in checked:
            return result
        checked.add(first)
        free = free_at(balancer, known, first, now)
        if free is None:
            return result
        blocked[first] = max(blocked.get(first, free), free)


def free_at(balancer: Balancer, known: Known, member: int, now: float) -> float | None:
    """None when the member has room under every limit now; otherwise when it will. The common
    case costs the backend a few look-ups (``totals``); only a member at a limit has its
    events read, to tell until when."""
    member_limits = balancer.members[member].limits
    if not member_limits or not limits.full(member_limits, known.totals(member)):
        return None
    since = now - max(limits.WINDOWS[name] for name in member_limits)
    requests, spent = known.events(member, since)
    frees = [
        limits.free_at(of_kind(member_limits, "r"), requests, now),
        limits.free_at(of_kind(member_limits, "t"), spent, now),
    ]
    frees = [free for free in frees if free is not None]
    return max(frees) if frees else None


def of_kind(member_limits: dict, kind: str) -> dict:
    "The request limits (kind ``r``) or the token limits (``t``) of a member."
    return {name: value for name, value in member_limits.items() if name.startswith(kind)}


def counted_ahead(balancer: Balancer, member: int) -> bool:
    """Whether a request of this member is recorded when it is chosen, not only when it ends:
    for its limits, and for least-busy, which counts the prompts in flight."""
    return bool(balancer.members[member].limits) or balancer.policy == "least-busy"


def in_flight(entries, now: float, alive) -> dict[int, int]:
    """Prompts in flight per member from (member, started at, process id or None) entries:
    younger than IN_FLIGHT_HOURS, of a process that ``alive`` says still runs."""
    counts: dict[int, int] = {}
    seen: dict = {}
    for member, at, pid in entries:
        if at <= now - IN_FLIGHT_HOURS * 3600:
            continue
        if pid not in seen:
            seen[pid] = alive(pid)
        if seen[pid]:
            counts[member] = counts.get(member, 0) + 1
    return counts


IN_FLIGHT_HOURS = 1  # least-busy: a prompt in flight longer than this stops counting
RECENT_TIMINGS = 20  # lowest-latency: the median of each member's last 20 timings ...
RECENT_HOURS = 1  # ... within the last hour


def median_latency(timings, now: float, stream: bool) -> float | None:
    """The median of a member's recent time to first chunk (streaming prompts) or total time
    (not streaming), from (at, first_chunk, total, streamed) newest first; None without any."""
    values = []
    for at, first_chunk, total, streamed in timings:
        value = first_chunk if stream else total
        if bool(streamed) == stream and value and value > 0 and at > now - RECENT_HOURS * 3600:
            values.append(value)
            if len(values) == RECENT_TIMINGS:
                break
    return spread(values)["median"] if values else None


def spread(values: list[float]) -> dict | None:
    "Median and 95th percentile (nearest rank), or None without values."
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.95 * len(ordered)) - 1))]
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"median": median, "p95": p95}
