"""Is there room under a member's limits, and when will there be? Pure decisions, no I/O.

A member may allow at most ``rpm`` / ``rpd`` requests and ``tpm`` / ``tpd`` tokens (input +
output, as the member reported them) in any 60 s / 24 h window. The store keeps the requests
counted and the tokens reported, and ``selection.free_at`` asks these functions inside the
same transaction (or snapshot) that then counts the next request, so that concurrent
processes never exceed a limit.

A prompt counts against a token limit from the moment it is chosen, at its estimate
(``estimates.py``), until its member reports: a token limit has room for it when what the
window holds, what the prompts in flight reserved and its own estimate fit under the limit
(``token_room``).
"""

from __future__ import annotations

from typing import NamedTuple

WINDOWS = {"rpm": 60.0, "rpd": 86400.0, "tpm": 60.0, "tpd": 86400.0}
LONGEST = max(WINDOWS.values())
# each limit's window, and what it counts in ``full``'s totals: requests (0) or tokens (1)
_COUNTED = {name: (window, 0 if name[0] == "r" else 1) for name, window in WINDOWS.items()}


POLL = 1.0  # seconds before looking again when only prompts in flight ending can make room


class Reserved(NamedTuple):
    "What the prompts in flight on a bucket reserved of its token windows."

    tokens: int = 0
    prompts: int = 0  # the prompts holding a reservation
    blind: int = 0  # of them, those sent with no estimate of their answer


NOTHING = Reserved()


class Use(NamedTuple):
    name: str  # rpm, rpd, tpm, tpd
    used: int  # requests or tokens in the current window
    limit: int


def usage(limits: dict, events, now: float) -> list[Use]:
    "Each limit's use in its current window; ``events`` are (time, tokens) of sent requests."
    result = []
    for name, limit in limits.items():
        start = now - WINDOWS[name]
        inside = [tokens for at, tokens in events if at > start]
        used = len(inside) if name.startswith("r") else sum(inside)
        result.append(Use(name, used, limit))
    return result


def full(limits: dict, totals: dict, reserved: Reserved = NOTHING, need=None) -> bool:
    """Whether any limit leaves no room for the prompt, given {window seconds: (requests,
    tokens)} in each of the member's windows now, what prompts in flight reserved, and the
    prompt's ``estimates.Need`` (None: not known, as if it cost one token)."""
    for name, limit in limits.items():
        window, counted = _COUNTED[name]
        used = totals[window][counted]
        if counted == 0:
            if used >= limit:
                return True
        elif not token_room(limit, used, reserved, need):
            return True
    return False


def token_room(limit: int, used: int, reserved: Reserved, need=None) -> bool:
    """Whether a token window has room for a prompt: when nothing is in it and nothing in
    flight, any prompt (alone: one estimated above the whole limit is not held back for ever);
    while a prompt whose answer could not be estimated is in flight, none; a prompt whose
    answer cannot be estimated (``need.blind``), when nothing else is in flight and its input
    fits; otherwise when the window, the reservations and its estimate (one token at least)
    fit under the limit. So a window never holds more than its limit while the estimates are
    not below what the prompts cost."""
    if used <= 0 and reserved.prompts == 0:
        return True
    if reserved.blind:
        return False
    if need is not None and need.blind:
        return reserved.prompts == 0 and used + need.tokens <= limit
    tokens = 0 if need is None else need.tokens
    return used + reserved.tokens + max(tokens, 1) <= limit


def free_at(
    limits: dict, events, now: float, reserved: Reserved = NOTHING, need=None
) -> float | None:
    """None when the prompt may be sent now; otherwise the earliest time at which every limit
    has room again: when enough of the requests (or tokens) in its window have aged out of
    it; while prompts in flight hold reservations, POLL seconds from now at the latest (when
    they end is not known)."""
    latest = None
    for name, limit in limits.items():
        window = WINDOWS[name]
        inside = sorted((at, tokens) for at, tokens in events if at > now - window)
        if name.startswith("r"):
            if len(inside) < limit:
                continue
            # the oldest len - limit + 1 requests must leave the window
            when = inside[len(inside) - limit][0] + window
        else:
            used = sum(tokens for _, tokens in inside)
            if token_room(limit, used, reserved, need):
                continue
            when = _aged(limit, used, inside, window, reserved, need)
            if reserved.prompts:  # they may end sooner: look again when that could make room
                soonest = now + POLL
                if not token_room(limit, used, NOTHING, need):
                    soonest = max(_aged(limit, used, inside, window, NOTHING, need), soonest)
                when = soonest if when is None else min(when, soonest)
        if when is not None and (latest is None or when > latest):
            latest = when
    return latest


def _aged(limit: int, used: int, inside, window: float, reserved: Reserved, need) -> float | None:
    """When enough of a token window's reports, (time, tokens) oldest first, have aged out of
    it to make room (``token_room``), or None: not before the reservations end."""
    for at, tokens in inside:
        used -= tokens
        if token_room(limit, used, reserved, need):
            return at + window
    return None
