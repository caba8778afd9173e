"""The rules of the state that do not depend on where it is kept, written once for every
backend: how long a member cools down after failing again, how the cooldowns on record read
(cooling down after a guessed time, or inside a provider's stated reset), which prompts are
still in flight, the provider's bucket of a member and the limits that apply to it, the
latency a member is judged by, and the statistics as ``llm lb stats`` shows them. Plain
functions, no I/O: a backend fetches the rows and hands them here.

(Where a rule must hold across processes, the backend calls it inside its transaction, or,
for Redis, around a compare-and-set: nothing here is restated in SQL or Lua.)
"""

from __future__ import annotations

import math

from .. import limits
from ..config import LIMITS, MAX_SECONDS, MAX_STATED_SECONDS
from ..estimates import History
from ..selection import of_kind, token_limited

IN_FLIGHT_HOURS = 1  # least-busy: a prompt in flight longer than this stops counting
RECENT_TIMINGS = 20  # lowest-latency: the median of each member's last 20 timings ...
RECENT_HOURS = 1  # ... within the last hour
RECENT = 100  # the timings kept per member: statistics and lowest-latency read these
KEEP_DAYS = 30  # conversation ties (and a server's keys) unused for this long are forgotten
DAY = 86400.0


def next_cooldown(cooldown: float, previous: float | None, exact: bool = False) -> float:
    """The length of a member's cooldown after a failure that calls for ``cooldown`` seconds:
    the time until a reset the provider stated (``exact``), as stated, up to
    MAX_STATED_SECONDS; otherwise twice the last one when the member still has one on record
    (it failed again right after it, before a success cleared it), and never more than
    MAX_SECONDS."""
    if exact:
        return min(cooldown, MAX_STATED_SECONDS)
    if previous is not None:
        cooldown = max(cooldown, 2 * previous)
    return min(cooldown, MAX_SECONDS)


def read_cooldowns(rows, now: float):
    """From the cooldowns on record, (member, until, stated, length) each: {member: until}
    cooling down after a guessed time, {member: until} inside a provider's stated reset
    (``stated``: a Retry-After or a quota's reset that the provider gave), every member with a
    cooldown on record, ended or not (what a success clears), and {member: until} of the
    cooldowns to date again. A cooldown never ends later than its own length from now (one
    recorded while the clock ran ahead, or before it was set back, ends its length after the
    clock is right, not days later) nor beyond MAX_SECONDS from now (MAX_STATED_SECONDS for a
    reset the provider stated); the backend stores the corrected end, so that it then runs
    out."""
    cooling, blocked, cooled, redated = {}, {}, set(), {}
    for member, until, stated, length in rows:
        cooled.add(member)
        if stated == PROBING:  # a probe in flight: blocked while its lease lasts
            latest = now + LEASE
        elif length and length > 0:  # (a row of an older version has none: a day at most)
            latest = now + min(length, MAX_STATED_SECONDS if stated else MAX_SECONDS)
        else:
            latest = now + MAX_SECONDS
        if until > latest + 0.001:
            until = redated[member] = latest
        if until > now:
            if stated == PROBING:  # (when it ends is not known: looked at again shortly)
                until = min(until, now + limits.POLL)
            (blocked if stated else cooling)[member] = until
    return cooling, blocked, frozenset(cooled), redated


# A member whose cooldown has ended, still on record (no success since), is due a probe: the
# next prompt chosen for it is the only one sent to it until it ends. Its cooldown is then
# on record as PROBING (``stated``), ending LEASE from when it was chosen (renewed while it
# runs), its length kept: a probe that fails cools the member down twice as long
# (``next_cooldown``), one that succeeds clears it, and one whose process died, or that ended
# without an outcome, leaves the member due again when its lease ends.
PROBING = 2
PROBE_REASON = "being probed"


def due(cooling: dict, blocked: dict, cooled) -> frozenset:
    "The members due a probe: a cooldown on record that has ended (``read_cooldowns``)."
    if not cooled:
        return frozenset()
    return frozenset(member for member in cooled if member not in cooling and member not in blocked)


def probe_reason(reason: str | None) -> str:
    "The reason a probe's cooldown is on record with: what it probes after."
    if reason and reason.startswith(PROBE_REASON):  # (probed again: its lease ran out)
        return reason
    return f"{PROBE_REASON}; {reason}" if reason else PROBE_REASON


def cooling_now(rows, now: float) -> dict:
    """{member: (until, reason)} of the cooldowns not yet ended, from (member, until, stated,
    length, reason) rows, their ends read as ``read_cooldowns`` reads them (what ``llm lb
    stats`` shows)."""
    cooling, blocked, _, _ = read_cooldowns([row[:4] for row in rows], now)
    reasons = {row[0]: row[4] for row in rows}
    return {member: (until, reasons[member]) for member, until in {**cooling, **blocked}.items()}


# A prompt in flight (least-busy) counts while its lease lasts: LEASE seconds from when it was
# chosen, renewed every RENEW seconds while it runs (``leases.py``). A process that dies stops
# renewing, and its prompts stop counting within LEASE seconds, whatever its process id becomes
# and wherever it ran: nothing asks the system about another process.
LEASE = 45.0
RENEW = 15.0


def in_flight(entries, now: float) -> dict[int, int]:
    """Prompts in flight per member from (member, started at, lease until) entries: started less
    than IN_FLIGHT_HOURS ago, with a lease not yet ended. A lease further than LEASE ahead was
    written by a clock that ran ahead: it does not count (a live prompt renews it within RENEW
    seconds)."""
    counts: dict[int, int] = {}
    for member, at, lease in entries:
        if at <= now - IN_FLIGHT_HOURS * 3600 or not now < lease <= now + LEASE + 0.001:
            continue
        counts[member] = counts.get(member, 0) + 1
    return counts


def reserved(entries, now: float) -> limits.Reserved:
    """What the prompts in flight on a bucket reserved of its token windows, from (tokens,
    blind, chosen at, lease until) entries: those chosen less than IN_FLIGHT_HOURS ago whose
    lease lasts. A prompt that ended, or whose process died, reserves nothing. A lease further
    ahead than LEASE (written before the clock was set back) still counts: no step of the clock
    lets a prompt past a reservation (the state file dates it LEASE from now)."""
    tokens = prompts = blind = 0
    for spent, unknown, at, lease in entries:
        if at <= now - IN_FLIGHT_HOURS * 3600 or lease <= now:
            continue
        tokens += spent
        prompts += 1
        blind += bool(unknown)
    return limits.Reserved(tokens, prompts, blind)


RECENT_REPORTS = 10  # a prompt's answer is estimated from the bucket's last 10 reports ...


def history(reports, now: float) -> History:
    """What a bucket's recent reports say of the next prompt's cost (``estimates.need``): from
    (at, tokens, input estimate, output) of its last RECENT_REPORTS reports, newest first, those
    of the last day that were estimated (a reservation kept without a report, or a report of an
    older version, has no estimate): the largest answer, and the most by which a report's input
    exceeded its estimate. (The state file asks its rows the same in SQL:
    ``sqlite._REPORTS``.)"""
    output, missed = None, 0
    for at, tokens, estimate, answer in reports[:RECENT_REPORTS]:
        if estimate is None or answer is None or at <= now - DAY:
            continue
        output = answer if output is None else max(output, answer)
        missed = max(missed, tokens - answer - estimate)
    return History(output, missed)


def bucket(member) -> str:
    """The provider's bucket a member's requests and tokens count against: its model and its
    stored key (as written: a model's alias is another bucket). Every balancer and definition
    using the pair shares the bucket's limit windows (in one state)."""
    return f"{member.model}\n{member.key or ''}"


def strictest(own: dict, declared, now: float) -> dict:
    """A member's limits with those declared for its bucket by members of any balancer or
    definition, (rpm, rpd, tpm, tpd, declared at) rows: for each limit, the lowest applies.
    A declaration not renewed for a day is forgotten."""
    if not declared:
        return own
    found = dict(own)
    for row in declared:
        if row[4] <= now - DAY:
            continue
        for name, value in zip(LIMITS, row):
            if value and (name not in found or value < found[name]):
                found[name] = value
    return found


def declaration(member_limits: dict) -> tuple:
    "(rpm, rpd, tpm, tpd) of a member's own limits, None where it has none: what it declares."
    return tuple(member_limits.get(name) for name in LIMITS)


DECLARE_EVERY = 3600.0  # a member's declaration is renewed when older than this


def declared_lately(at: float | None, now: float) -> bool:
    "Whether a member's own declaration, made at ``at``, need not be renewed yet."
    return at is not None and now - DECLARE_EVERY < at <= now


def counts_tokens(member_limits: dict, ticket=None) -> bool:
    """Whether the tokens a member reports count against its bucket's windows: a token limit
    applies to it (its own, or, as the ticket its choice gave says, declared by another)."""
    return token_limited(member_limits) or getattr(ticket, "tokens", False)


def spent(outcome, ticket) -> tuple[int, int | None, int | None]:
    """What an attempt's end puts in its bucket's token windows, in place of its reservation:
    (tokens, their input estimate, their answer). The tokens its member reported, with the
    estimate they are compared with (``history``); a member that reported none keeps its
    reservation when it answered (or had begun to: the provider counted it), and frees it
    when it did not."""
    reported = outcome.tokens_in + outcome.tokens_out
    reserved = getattr(ticket, "reserved", None)
    if reported > 0:
        estimate = getattr(ticket, "estimate", None) if reserved is not None else None
        return reported, estimate, outcome.tokens_out if estimate is not None else None
    if reserved and (outcome.error is None or outcome.first_chunk is not None):
        return reserved, None, None
    return 0, None, None


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


def shape_stats(
    balancer, rows, cooling, events, timings, now: float, applied=None, reservations=None
) -> list[dict]:
    """The statistics of each member as ``llm lb stats`` gives them, from what a backend read:
    ``rows`` {member: (requests, successes, failures, last used, last error, tokens in, tokens
    out, items)}, ``cooling`` {member: (until, reason)} of the cooldowns not yet ended,
    ``events`` {member: (requests, token reports)} of the last day, as (time, 0) and (time,
    tokens), ``timings`` {member: [(first chunk, total)]}, newest first (the last RECENT),
    ``applied`` {member: the limits that apply to it (``strictest``)}, its own where left out,
    ``reservations`` {member: what prompts in flight reserved of its bucket (``reserved``)}."""
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
                "limits": _limits_now(
                    (applied or {}).get(index, member.limits),
                    events.get(index, ([], [])),
                    now,
                    (reservations or {}).get(index, limits.NOTHING),
                ),
                "last_used": last_used,
                "last_error": last_error,
                "cooling_down_until": until,
                "cooling_down_for": reason.split(":")[0] if until and reason else None,
            }
        )
    return result


def _limits_now(member_limits: dict, events, now: float, reserved: limits.Reserved) -> dict:
    """Each limit's use in its window now; a token limit's also the tokens reserved by prompts
    in flight (not yet reported)."""
    requests, spent = events
    uses = limits.usage(of_kind(member_limits, "r"), requests, now) + limits.usage(
        of_kind(member_limits, "t"), spent, now
    )
    by_name = {use.name: {"used": use.used, "limit": use.limit} for use in uses}
    for name, found in by_name.items():
        if name[0] == "t":
            found["reserved"] = reserved.tokens
    return {name: by_name[name] for name in member_limits}
