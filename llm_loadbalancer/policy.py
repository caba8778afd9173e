"""Which member goes first: pure decisions, no I/O.

``plan`` gets what the store knows (the rotation position, cooldowns, members at their limits,
a member the conversation is tied to), through ``selection.choose``, and returns the order in
which members are tried and the next rotation position, or, when no member may be asked now,
which one to wait for. The store keeps the result in the same transaction (or snapshot).
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
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


# Totals of weights up to this (weights written as percentages, say) have nginx's exact cycle,
# built once per process: 30 to 50 us at 100, but 0.4 ms at 1,000, where a prompt would also
# walk up to 1,000 slots to find a light member. Larger totals have the Webster cycle of
# _keyed, never built: 11 to 13 us a prompt with 2 or 3 members, whatever their weights.
BUILT_UP_TO = 100


@functools.lru_cache(maxsize=256)  # (a prompt looks it up in 0.1 us; built, 2 to 5 us)
def schedule(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One cycle of smooth weighted round-robin (as nginx does it): each member appears as often
    as its weight, spread out: weights 5, 1, 1 give a a b a c a a. Equal weights give 0, 1, 2 ...
    Used for totals up to BUILT_UP_TO: the cycle has one entry per unit of weight."""
    current = [0] * len(weights)
    total = sum(weights)
    cycle = []
    pairs = tuple(enumerate(weights))
    for _ in range(total):
        for index, weight in pairs:
            current[index] += weight
        # the first of the largest: ties to the member listed first (in 40% of the time that
        # max() with a key takes)
        chosen = current.index(max(current))
        current[chosen] -= total
        cycle.append(chosen)
    return tuple(cycle)


def rotation(weights: tuple[int, ...], start: int) -> tuple[list[int], Callable[[int], int]]:
    """Every member once, in the order the weighted cycle reaches them from slot ``start`` on
    (wrapping around), and a function giving the slot where it reaches a member."""
    if sum(weights) > BUILT_UP_TO:
        return _keyed(weights, start)
    return _built(weights, start)


@functools.lru_cache(maxsize=1024)  # (at most BUILT_UP_TO starts per set of weights)
def _built(weights: tuple[int, ...], start: int) -> tuple[tuple[int, ...], Callable[[int], int]]:
    "``rotation`` over the built cycle, for a total up to BUILT_UP_TO."
    cycle = schedule(weights)
    first: dict[int, int] = {}
    for slot in itertools.chain(range(start, len(cycle)), range(start)):
        first.setdefault(cycle[slot], slot)
        if len(first) == len(weights):
            break
    return tuple(first), first.__getitem__


# --- the Webster cycle, for totals too large to build ----------------------------------------
#
# Member j's k-th appearance (k = 0 .. weight - 1) has the key (2k + 1) / (2 * weight); the cycle
# is every appearance in key order, ties to the member listed first (Sainte-Lague's order of
# seats). Each member appears exactly its weight times, evenly: an appearance with key x is at
# slot total * x, give or take len(weights) / 2 (before it, each member j has its appearances with
# keys below x, weight_j * x give or take 1/2). Only whole numbers are used, so every process
# computes the same cycle. An appearance is (2k + 1, 2 * weight, member): its key as a fraction.


def _keyed(weights: tuple[int, ...], start: int) -> tuple[list[int], Callable[[int], int]]:
    "``rotation`` over the Webster cycle, in a few operations per member whatever the weights."
    key = _key(weights)
    odd, double, first_member = _at_slot(weights, start, key)
    nexts, wrapped = [], []
    for member, weight in enumerate(weights):
        # its first appearance at or after the one at ``start``: the least odd 2k + 1 with
        # (2k + 1) / (2 * weight) >= odd / double (>, for a member listed before, to lose the tie)
        top = 2 * weight * odd
        least = top // double + 1 if member < first_member else -(-top // double)
        least += 1 - least % 2
        if least < 2 * weight:
            nexts.append((least, 2 * weight, member))
        else:  # it has no appearance left in this cycle: its first in the next
            wrapped.append((1, 2 * weight, member))
    order = sorted(nexts, key=key) + sorted(wrapped, key=key)
    ks = {member: (odd - 1) // 2 for odd, _, member in order}
    return [member for *_, member in order], lambda member: _slot(weights, member, ks[member])


def _key(weights: tuple[int, ...]):
    """A sort key of appearances in cycle order, in whole numbers: the key scaled by 2 ** shift
    and rounded down. Two different keys differ by at least 1 / (2 * max(weights)) ** 2, which
    the scaling makes at least 1, so rounding keeps them apart."""
    shift = 2 * (2 * max(weights)).bit_length()
    return lambda appearance: ((appearance[0] << shift) // appearance[1], appearance[2])


def _slot(weights: tuple[int, ...], member: int, k: int) -> int:
    "The slot of a member's k-th appearance: how many appearances come before it."
    own = weights[member]
    slot = 0
    for other, weight in enumerate(weights):
        # other's appearances (2m + 1) / (2 * weight) before (2k + 1) / (2 * own): the odd
        # numbers t with t * own < (2k + 1) * weight (<=, for a member listed before: it wins
        # ties); ``below`` counts all the whole numbers t, and half of them, rounded up, are odd
        bound = (2 * k + 1) * weight
        below = bound // own if other < member else (bound - 1) // own
        slot += (below + 1) // 2
    return slot


def _at_slot(weights: tuple[int, ...], slot: int, key) -> tuple[int, int, int]:
    """The appearance at ``slot``. Its key times the total is within len(weights) / 2 of
    ``slot``, so the appearances with keys in a window of that reach are listed in order, and
    the first one's slot says which of them is at ``slot``."""
    total = sum(weights)
    low, high = slot - len(weights) // 2 - 1, slot + len(weights) // 2 + 1
    window = []
    for member, weight in enumerate(weights):
        # the k with low / total <= (2k + 1) / (2 * weight) <= high / total
        first = max(0, -(-(2 * weight * low - total) // (2 * total)))
        last = min(weight - 1, (2 * weight * high - total) // (2 * total))
        window += [(2 * k + 1, 2 * weight, member) for k in range(first, last + 1)]
    window.sort(key=key)
    odd, _, member = window[0]
    return window[slot - _slot(weights, member, (odd - 1) // 2)]


def plan(
    policy: str,
    count: int,
    position: int,
    cooling: dict[int, float],
    now: float,
    *,
    pinned: int | None = None,
    preferred: int | None = None,
    preferred_why: str = "the conversation's member",
    unavailable: frozenset[int] = frozenset(),
    weights: tuple[int, ...] | None = None,
    tiers: tuple[int, ...] | None = None,
    blocked: dict[int, float] | None = None,
    busy: dict[int, int] | None = None,
    latency: dict[int, float] | None = None,
    rng=None,
) -> Plan:
    """Decide the order of members for one prompt.

    - ``pinned``: the only member that may answer (a tool-result turn goes back to the member
      that made the tool calls); the rotation does not move.
    - ``preferred``: tried first when it is not cooling down (a sticky conversation, a
      prompt prefix's member: ``preferred_why`` says which); the rotation does not move.
    - ``roundrobin``: walk the weighted cycle (``rotation``) from ``position``; the first
      member available goes first, the others follow in cycle order; the next prompt starts
      after the slot chosen. ``failover``: always the members in the order listed (weights
      unused).
    - ``blocked`` members ({index: time it may be asked again}: at a limit, or inside a
      provider's Retry-After) are never asked; when no other member may be, ``wait`` says for
      which member to wait, and until when.
    - Members cooling down after a guessed time (``cooling[i] > now``) are skipped while any
      other is available; when every member is, all are tried, the soonest to end first.
    - ``unavailable`` members (no longer installed) are never tried.
    - ``tiers`` (each member's, None: all in one): the policy chooses among the available
      members of the lowest tier that has one; the members of higher tiers follow, tier by
      tier (a failover reaches them only when every lower one failed). A preferred member of a
      higher tier waits until no lower one is available.
    - ``least-busy``: the member with the fewest prompts in flight (``busy``) first, ties in
      rotation order. ``lowest-latency``: members with no recent timing (not in ``latency``)
      first, then the fastest; a share EXPLORE of prompts (drawn with ``rng``) goes in rotation
      order instead. ``random``: a weighted random order, drawn with ``rng``.
    """
    blocked = blocked or {}
    weights = weights or (1,) * count
    total = count if policy == "failover" else sum(weights)
    position = position % total if total else 0
    if pinned is not None and 0 <= pinned < count:
        if pinned in blocked:
            return Plan((), (), position, (blocked[pinned], pinned))
        return Plan((pinned,), (), position, why="the member that made the tool calls")
    if policy == "failover":
        members, slot = range(count), None
    else:
        members, slot = rotation(weights, position)
    base = [index for index in members if index not in unavailable and index not in blocked]
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
            return Plan(tuple(order), (), _advance(policy, slot, order[0], position, total))
        skipped = tuple(index for index in base if index not in available)
    if tiers is not None:
        lowest = min(tiers[index] for index in available)
        if preferred is not None and preferred in available and tiers[preferred] != lowest:
            preferred = None  # a lower tier is available again
    if preferred is not None and preferred in available:
        order = [preferred] + [index for index in available if index != preferred]
        if tiers is not None:
            order[1:] = sorted(order[1:], key=tiers.__getitem__)
        return Plan(tuple(order), skipped, position, why=preferred_why)
    order, why = _by_policy(policy, available, weights, busy, latency, rng)
    if tiers is not None:
        order = sorted(order, key=tiers.__getitem__)  # (stable: the policy's order within each)
        why = f"{why}, tier {lowest}"
    return Plan(tuple(order), skipped, _advance(policy, slot, order[0], position, total), why=why)


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


def _advance(policy: str, slot, first: int, position: int, total: int) -> int:
    "The rotation position after the slot where the cycle reaches the first member chosen."
    if policy in ("failover", "random"):
        return position
    return (slot(first) + 1) % total
