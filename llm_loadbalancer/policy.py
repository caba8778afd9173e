"""Which member goes first: pure decisions, no I/O.

``plan`` gets what the store knows (the rotation position, cooldowns, members at their limits,
a member the conversation is tied to), through ``selection.choose``, and returns the order in
which members are tried and the next rotation position, or, when no member may be asked now,
which one to wait for. The store keeps the result in the same transaction (or snapshot).
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

# The policies' names are config.POLICIES: a model lookup reads them without this module.
EXPLORE = 0.1  # lowest-latency: the share of prompts that go in rotation, to keep estimates fresh


class Plan(NamedTuple):
    order: tuple[int, ...]  # member indexes to try, first choice first
    skipped: tuple[int, ...]  # members left out because they are cooling down
    position: int  # the rotation position to store for the next prompt
    # when no member may be asked now: (the time the first one may, that member)
    wait: tuple[float, int] | None = None
    why: str = "rotation"  # why the first member was chosen, for the debug line


@functools.lru_cache(maxsize=256)  # (a prompt looks it up in 0.1 us; built, 2 to 5 us)
def schedule(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One cycle of smooth weighted round-robin (as nginx does it): each member appears as often
    as its weight, spread out: weights 5, 1, 1 give a a b a c a a. Equal weights give 0, 1, 2 ..."""
    current = [0] * len(weights)
    total = sum(weights)
    cycle = []
    for _ in range(total):
        for index, weight in enumerate(weights):
            current[index] += weight
        chosen = max(range(len(weights)), key=lambda index: (current[index], -index))
        current[chosen] -= total
        cycle.append(chosen)
    return tuple(cycle)


def plan(
    policy: str,
    count: int,
    position: int,
    cooling: dict[int, float],
    now: float,
    *,
    pinned: int | None = None,
    preferred: int | None = None,
    unavailable: frozenset[int] = frozenset(),
    weights: tuple[int, ...] | None = None,
    blocked: dict[int, float] | None = None,
    busy: dict[int, int] | None = None,
    latency: dict[int, float] | None = None,
    rng=None,
) -> Plan:
    """Decide the order of members for one prompt.

    - ``pinned``: the only member that may answer (a tool-result turn goes back to the member
      that made the tool calls); the rotation does not move.
    - ``preferred``: tried first when it is not cooling down (a sticky conversation); the
      rotation does not move.
    - ``roundrobin``: walk the weighted ``schedule`` from ``position``; the first member
      available goes first, the others follow in schedule order; the next prompt starts after
      the slot chosen. ``failover``: always the members in the order listed (weights unused).
    - ``blocked`` members ({index: time it may be asked again}: at a limit, or inside a
      provider's Retry-After) are never asked; when no other member may be, ``wait`` says for
      which member to wait, and until when.
    - Members cooling down after a guessed time (``cooling[i] > now``) are skipped while any
      other is available; when every member is, all are tried, the soonest to end first.
    - ``unavailable`` members (no longer installed) are never tried.
    - ``least-busy``: the member with the fewest prompts in flight (``busy``) first, ties in
      rotation order. ``lowest-latency``: members with no recent timing (not in ``latency``)
      first, then the fastest; a share EXPLORE of prompts (drawn with ``rng``) goes in rotation
      order instead. ``random``: a weighted random order, drawn with ``rng``.
    """
    blocked = blocked or {}
    cycle = schedule(weights or (1,) * count) if policy != "failover" else tuple(range(count))
    position = position % len(cycle) if cycle else 0
    if pinned is not None and 0 <= pinned < count:
        if pinned in blocked:
            return Plan((), (), position, (blocked[pinned], pinned))
        return Plan((pinned,), (), position, why="the member that made the tool calls")
    start = 0 if policy == "failover" else position
    slots = [*range(start, len(cycle)), *range(start)]  # the cycle, from start
    base = []
    first_slot = {}
    for slot in slots:
        index = cycle[slot]
        if index not in first_slot and index not in unavailable and index not in blocked:
            first_slot[index] = slot
            base.append(index)
    if not base:
        if blocked:
            when, index = min((when, index) for index, when in blocked.items())
            return Plan((), (), position, (when, index))
        return Plan((), (), position)
    available, skipped = base, ()
    if cooling:
        available = [index for index in base if cooling.get(index, 0.0) <= now]
        if not available:
            order = sorted(base, key=lambda index: (cooling.get(index, 0.0), base.index(index)))
            return Plan(tuple(order), (), _advance(policy, first_slot[order[0]], position, cycle))
        skipped = tuple(index for index in base if index not in available)
    if preferred is not None and preferred in available:
        order = [preferred] + [index for index in available if index != preferred]
        return Plan(tuple(order), skipped, position, why="the conversation's member")
    order, why = _by_policy(policy, available, weights or (1,) * count, busy, latency, rng)
    return Plan(
        tuple(order), skipped, _advance(policy, first_slot[order[0]], position, cycle), why=why
    )


def _by_policy(policy, available, weights, busy, latency, rng):
    "The order of the available members (given in rotation order) under ``policy``, and why."
    if policy == "least-busy":
        busy = busy or {}
        order = sorted(available, key=lambda index: busy.get(index, 0))
        counts = ", ".join(f"{index + 1}: {busy.get(index, 0)}" for index in sorted(available))
        return order, f"least busy (in flight by member: {counts})"
    if policy == "lowest-latency":
        latency = latency or {}
        unknown = [index for index in available if index not in latency]
        if unknown:
            order = unknown + sorted(
                (index for index in available if index in latency), key=latency.__getitem__
            )
            return order, "no recent timing yet"
        if rng is not None and rng.random() < EXPLORE:
            return available, "exploring, in rotation order"
        order = sorted(available, key=latency.__getitem__)
        return order, f"lowest recent latency ({latency[order[0]] * 1000:.0f} ms)"
    if policy == "random":
        pool, order = list(available), []
        while pool:
            pick = (rng or random).choices(pool, weights=[weights[index] for index in pool])[0]
            order.append(pick)
            pool.remove(pick)
        return order, "random, by weight"
    return available, "rotation" if policy != "failover" else "the first listed"


def _advance(policy: str, slot: int, position: int, cycle: tuple[int, ...]) -> int:
    if policy in ("failover", "random"):
        return position
    return (slot + 1) % len(cycle)
