"""Is there room under a member's limits, and when will there be? Pure decisions, no I/O.

A member may allow at most ``rpm`` / ``rpd`` requests and ``tpm`` / ``tpd`` tokens (input +
output, as the member reported them) in any 60 s / 24 h window. The store keeps the requests
counted and the tokens reported, and ``selection.free_at`` asks these functions inside the
same transaction (or snapshot) that then counts the next request, so that concurrent
processes never exceed a limit. A request whose usage is unknown counts as 0 tokens; a token limit has room while the
tokens already used in its window are below it (the next request's size is not known before
it is sent).
"""

from __future__ import annotations

from typing import NamedTuple

WINDOWS = {"rpm": 60.0, "rpd": 86400.0, "tpm": 60.0, "tpd": 86400.0}
LONGEST = max(WINDOWS.values())
# each limit's window, and what it counts in ``full``'s totals: requests (0) or tokens (1)
_COUNTED = {name: (window, 0 if name[0] == "r" else 1) for name, window in WINDOWS.items()}


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


def full(limits: dict, totals: dict) -> bool:
    """Whether any limit is reached, given {window seconds: (requests, tokens)} in each of
    the member's windows now."""
    for name, limit in limits.items():
        window, counted = _COUNTED[name]
        if totals[window][counted] >= limit:
            return True
    return False


def free_at(limits: dict, events, now: float) -> float | None:
    """None when another request may be sent now; otherwise the earliest time at which every
    limit has room again (when enough of the requests in its window have aged out of it)."""
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
            if used < limit:
                continue
            when = None
            for at, tokens in inside:
                used -= tokens
                if used < limit:
                    when = at + window
                    break
        if when is not None and (latest is None or when > latest):
            latest = when
    return latest
