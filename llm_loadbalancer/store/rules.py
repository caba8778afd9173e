"""The rules of the state that do not depend on where it is kept, written once for every
backend: how long a member cools down after failing again, how the cooldowns on record read
(cooling down after a guessed time, or inside a provider's stated reset), which prompts are
still in flight, the latency a member is judged by, and the statistics as ``llm lb stats``
shows them. Plain functions, no I/O: a backend fetches the rows and hands them here.

(Where a rule must hold across processes, the backend calls it inside its transaction, or,
for Redis, around a compare-and-set: nothing here is restated in SQL or Lua.)
"""

from __future__ import annotations

import math
import os
import sys

from .. import limits
from ..config import MAX_SECONDS
from ..selection import of_kind

IN_FLIGHT_HOURS = 1  # least-busy: a prompt in flight longer than this stops counting
RECENT_TIMINGS = 20  # lowest-latency: the median of each member's last 20 timings ...
RECENT_HOURS = 1  # ... within the last hour
RECENT = 100  # the timings kept per member: statistics and lowest-latency read these
KEEP_DAYS = 30  # conversation ties (and a server's keys) unused for this long are forgotten
DAY = 86400.0


def next_cooldown(cooldown: float, previous: float | None) -> float:
    """The length of a member's cooldown after a failure that calls for ``cooldown`` seconds:
    twice the last one when the member still has one on record (it failed again right after
    it, before a success cleared it), and never more than MAX_SECONDS, whatever its source."""
    if previous is not None:
        cooldown = max(cooldown, 2 * previous)
    return min(cooldown, MAX_SECONDS)


def read_cooldowns(rows, now: float):
    """From the cooldowns on record, (member, until, stated) each: {member: until} cooling down
    after a guessed time, {member: until} inside a provider's stated reset (``stated``: a
    Retry-After or a quota's reset that the provider gave), and every member with a cooldown
    on record, ended or not (what a success clears)."""
    cooling, blocked, cooled = {}, {}, set()
    for member, until, stated in rows:
        cooled.add(member)
        if until > now:
            (blocked if stated else cooling)[member] = min(until, now + MAX_SECONDS)
    return cooling, blocked, frozenset(cooled)


def in_flight(entries, now: float, alive) -> dict[int, int]:
    """Prompts in flight per member from (member, started at, process) entries: younger than
    IN_FLIGHT_HOURS, of a process that ``alive(process)`` says still runs (asked once each)."""
    counts: dict[int, int] = {}
    seen: dict = {}
    for member, at, process in entries:
        if at <= now - IN_FLIGHT_HOURS * 3600:
            continue
        if process not in seen:
            seen[process] = alive(process)
        if seen[process]:
            counts[member] = counts.get(member, 0) + 1
    return counts


def alive(pid) -> bool:
    """Whether the process of this machine with that id still runs. (Not ``os.kill(pid, 0)`` on
    Windows, where it ends the process.)"""
    if pid is None or pid == os.getpid():
        return pid is not None
    if sys.platform == "win32":
        return _alive_on_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and belongs to someone else
        return True
    return True


def _alive_on_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # access denied: it exists, someone else's
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def median_latency(timings, now: float, stream: bool) -> float | None:
    """The median of a member's recent time to first chunk (streaming prompts) or total time
    (not streaming): of its last RECENT_TIMINGS of that kind within RECENT_HOURS, from (at,
    first_chunk, total, streamed) newest first; None without any."""
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


def shape_stats(balancer, rows, cooling, events, timings, now: float) -> list[dict]:
    """The statistics of each member as ``llm lb stats`` gives them, from what a backend read:
    ``rows`` {member: (requests, successes, failures, last used, last error, tokens in, tokens
    out, items)}, ``cooling`` {member: (until, reason)} of the cooldowns not yet ended,
    ``events`` {member: (requests, token reports)} of the last day, as (time, 0) and (time,
    tokens), ``timings`` {member: [(first chunk, total)]}, newest first (the last RECENT)."""
    total = sum(r[0] for r in rows.values())
    result = []
    for index, member in enumerate(balancer.members):
        requests, successes, failures, last_used, last_error, tokens_in, tokens_out, items = (
            rows.get(index, (0, 0, 0, None, None, 0, 0, 0))
        )
        until, reason = cooling.get(index, (None, None))
        if until is not None and not math.isfinite(until):
            until = now + MAX_SECONDS
        recent = timings.get(index, [])[:RECENT]
        result.append(
            {
                "member": index + 1,
                "requests": requests,
                "successes": successes,
                "failures": failures,
                "share": (requests / total) if total else 0.0,
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "items": items,
                "first_chunk": spread([first for first, _ in recent if first is not None]),
                "total_time": spread([whole for _, whole in recent]),
                "limits": _limits_now(member.limits, events.get(index, ([], [])), now),
                "last_used": last_used,
                "last_error": last_error,
                "cooling_down_until": until,
                "cooling_down_for": reason.split(":")[0] if until and reason else None,
            }
        )
    return result


def _limits_now(member_limits: dict, events, now: float) -> dict:
    requests, spent = events
    uses = limits.usage(of_kind(member_limits, "r"), requests, now) + limits.usage(
        of_kind(member_limits, "t"), spent, now
    )
    by_name = {use.name: {"used": use.used, "limit": use.limit} for use in uses}
    return {name: by_name[name] for name in member_limits}
