"""Choosing the members for one prompt from what a store knows: the one decision every
backend (the SQLite file, a Redis server) shares. No I/O of its own: the backend reads, inside
its transaction (SQLite) or snapshot (Redis), what ``Snapshot`` asks for, and stores the result.
"""

from __future__ import annotations

from typing import Protocol

from . import affinity, estimates, limits
from .config import Balancer
from .policy import Plan, plan


class Snapshot(Protocol):
    "What a store knows about a balancer at one moment."

    position: int  # the rotation position
    cooling: dict[int, float]  # {member: until} cooling down after a guessed time
    blocked: dict[int, float]  # {member: until} inside a provider's Retry-After
    redated: dict[int, float]  # {member: until} of cooldowns to store again (a clock step)
    tie: tuple[int, int] | None  # the conversation's (first, last) member, where asked for
    home: tuple[int, float] | None  # the prompt prefix's (member, when it last served it)
    busy: dict[int, int] | None  # least-busy: prompts in flight per member
    latency: dict[int, float] | None  # lowest-latency: recent median per member
    needs: dict  # {member: the prompt's ``estimates.Need`` of it} (need_of's, within a choice)

    def limits(self, member: int) -> dict:
        """The limits that apply to the member: its own, and those other members (of any
        balancer) declared for its provider's bucket, the strictest of each
        (``rules.strictest``)."""

    def totals(self, member: int, exact: bool = False) -> dict[float, tuple[int, int]]:
        """{window seconds: (requests, tokens)} of the member's bucket in each window of the
        limits that apply to it, now: at least those (a backend may give a bound it knows
        more cheaply), or, ``exact``, those."""

    def events(self, member: int, since: float) -> tuple[list, list]:
        "(time, 0) of each request and (time, tokens) of each report of the member since then."

    def reserved(self, member: int) -> limits.Reserved:
        "What prompts in flight reserved of the member's bucket's token windows, now."

    def history(self, member: int) -> estimates.History:
        "What the recent reports of the member's bucket say (``rules.history``)."


def choose(
    balancer: Balancer,
    snapshot: Snapshot,
    *,
    tool_turn: bool = False,
    unavailable: frozenset[int] = frozenset(),
    rng=None,
    now: float,
    demand=None,
    prefix: str | None = None,
) -> Plan:
    """The order of members for one prompt and the next rotation position. Only the member
    chosen first has its limits looked at (the others, if the prompt fails over to them, when
    they are claimed): one at a limit is left out, and the choice made again. ``demand``: the
    prompt's ``estimates.Demand``, for token limits (None: one token). ``prefix``: the digest of
    its long prefix (``affinity.prefix``), whose member (``snapshot.home``) it goes to first
    while that served it less than ``affinity`` seconds ago, unless it continues a
    conversation (its member first, as with ``sticky``)."""
    pinned = preferred = None
    why = "the conversation's member"
    if snapshot.tie is not None:
        if tool_turn:
            pinned = snapshot.tie[1]
        elif balancer.sticky or balancer.affinity:
            preferred = snapshot.tie[0]
    home = snapshot.home
    if pinned is None and preferred is None and prefix and home is not None:
        member, at = home
        if 0 <= member < len(balancer.members) and now - at <= balancer.affinity:
            preferred, why = member, affinity.why(prefix, max(now - at, 0.0))
    blocked = dict(snapshot.blocked)
    checked = set()
    while True:
        result = plan(
            balancer.policy,
            len(balancer.members),
            snapshot.position,
            snapshot.cooling,
            now,
            pinned=pinned,
            preferred=preferred,
            preferred_why=why,
            unavailable=unavailable,
            weights=balancer.weights,
            tiers=balancer.tiers,
            blocked=blocked,
            busy=snapshot.busy,
            latency=snapshot.latency,
            rng=rng,
        )
        first = result.order[0] if result.order else None
        if first is None or first in checked:
            return result
        checked.add(first)
        free = free_at(balancer, snapshot, first, now, demand)
        if free is None:
            return result
        blocked[first] = max(blocked.get(first, free), free)


def free_at(
    balancer: Balancer, snapshot: Snapshot, member: int, now: float, demand=None
) -> float | None:
    """None when the member has room under every limit now for the prompt (``demand``);
    otherwise when it will. The common case costs the backend a few look-ups (``totals``);
    only a member at a limit has its events read, to tell until when."""
    member_limits = snapshot.limits(member)
    if not member_limits:
        return None
    need = need_of(snapshot, member, demand)
    reserved = snapshot.reserved(member) if token_limited(member_limits) else limits.NOTHING
    if not limits.full(member_limits, snapshot.totals(member), reserved, need):
        return None
    if not limits.full(member_limits, snapshot.totals(member, exact=True), reserved, need):
        return None  # (the backend gave a bound of its windows, which left no room)
    since = now - max(limits.WINDOWS[name] for name in member_limits)
    requests, spent = snapshot.events(member, since)
    frees = [
        limits.free_at(of_kind(member_limits, "r"), requests, now),
        limits.free_at(of_kind(member_limits, "t"), spent, now, reserved, need),
    ]
    frees = [free for free in frees if free is not None]
    return max(frees) if frees else None


def need_of(snapshot: Snapshot, member: int, demand) -> estimates.Need | None:
    """What the prompt reserves of the member's token windows (``estimates.need``), or None:
    no token limit applies to it, or its size is not known (a batch of embeddings)."""
    if demand is None or not token_limited(snapshot.limits(member)):
        return None
    found = snapshot.needs.get(member)
    if found is None:
        found = snapshot.needs[member] = estimates.need(
            demand.input, demand.cap(member), snapshot.history(member)
        )
    return found


def token_limited(member_limits: dict) -> bool:
    "Whether a token limit (``tpm``, ``tpd``) is among the limits."
    return "tpm" in member_limits or "tpd" in member_limits


def of_kind(member_limits: dict, kind: str) -> dict:
    "The request limits (kind ``r``) or the token limits (``t``) of a member."
    return {name: value for name, value in member_limits.items() if name.startswith(kind)}


def limited(balancer: Balancer, snapshot: Snapshot, now: float, demand=None) -> dict:
    "{member: when it has room again} of the members at a limit now (``free_at``)."
    found = {}
    for member in range(len(balancer.members)):
        free = free_at(balancer, snapshot, member, now, demand)
        if free is not None:
            found[member] = free
    return found


def by_affinity(plan: Plan) -> bool:
    "Whether the plan sends the prompt to its prefix's member."
    return plan.why.startswith("affinity")


def counted_ahead(balancer: Balancer, snapshot: Snapshot, member: int) -> bool:
    """Whether a request of this member is recorded when it is chosen, not only when it ends:
    for the limits that apply to it, and for least-busy, which counts the prompts in flight."""
    return balancer.policy == "least-busy" or bool(snapshot.limits(member))
