"""Which member goes first: pure decisions, no I/O.

``plan`` gets what the state file knows (the rotation position, cooldowns, a member the
conversation is tied to) and returns the order in which members are tried and the next
rotation position. ``state.py`` stores the result in the same transaction.
"""

from __future__ import annotations

from typing import NamedTuple


class Plan(NamedTuple):
    order: tuple[int, ...]  # member indexes to try, first choice first
    skipped: tuple[int, ...]  # members left out because they are cooling down
    position: int  # the rotation position to store for the next prompt


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
) -> Plan:
    """Decide the order of members for one prompt.

    - ``pinned``: the only member that may answer (a tool-result turn goes back to the member
      that made the tool calls); the rotation does not move.
    - ``preferred``: tried first when it is not cooling down (a sticky conversation); the
      rotation does not move.
    - ``roundrobin``: start at ``position``; the next prompt starts after the member chosen.
    - ``failover``: always start at the first member listed.
    Members cooling down (``cooling[i] > now``) are skipped while any other is available; when
    every member is cooling down, all are tried, the one whose cooldown ends first first.
    ``unavailable`` members (no longer installed) are never tried.
    """
    position = position % count if count else 0
    if pinned is not None and 0 <= pinned < count:
        return Plan((pinned,), (), position)
    if policy == "failover":
        base = list(range(count))
    else:
        base = [(position + step) % count for step in range(count)]
    base = [index for index in base if index not in unavailable]
    if not base:
        return Plan((), (), position)
    available = [index for index in base if cooling.get(index, 0.0) <= now]
    if not available:
        order = sorted(base, key=lambda index: (cooling.get(index, 0.0), base.index(index)))
        return Plan(tuple(order), (), _advance(policy, order[0], position, count))
    skipped = tuple(index for index in base if index not in available)
    if preferred is not None and preferred in available:
        order = [preferred] + [index for index in available if index != preferred]
        return Plan(tuple(order), skipped, position)
    return Plan(tuple(available), skipped, _advance(policy, available[0], position, count))


def _advance(policy: str, chosen: int, position: int, count: int) -> int:
    if policy == "failover":
        return position
    return (chosen + 1) % count
