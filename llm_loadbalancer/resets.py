"""When a provider says a member may be asked again: the reset it states when it refuses a
request, read from the error the member's SDK raised. Pure: no I/O; the time is given.

The first of these found, along the error's cause chain, is the reset:

1. ``retry-after-ms``, then ``Retry-After`` (seconds, or an HTTP date): when to try again.
2. The reset headers of the limits with nothing left (their ``-remaining`` header says 0):
   OpenAI's, and compatible servers', ``x-ratelimit-reset-requests`` and
   ``x-ratelimit-reset-tokens`` (durations: ``1s``, ``6m0s``, ``1m26.4s``, ``20ms``); Anthropic's
   ``anthropic-ratelimit-requests-reset``, ``-tokens-reset``, ``-input-tokens-reset`` and
   ``-output-tokens-reset`` (RFC 3339 times). The latest of them: before it, the request is
   known to be refused again. (A limit with some left did not refuse it: its reset says when
   it is full again, which can be hours away, not when a request may be sent.)
3. Gemini's ``google.rpc.RetryInfo`` in the error's body (``"retryDelay": "37s"``), or in its
   message, where Gemini's OpenAI-compatible endpoint puts the body as Python's repr.
4. The message: ``Please try again in 7m54.336s`` (OpenAI, Groq and other compatible servers),
   ``Please retry in 37.5s`` (Gemini).

A value that is not a number (``nan``, ``inf``, words), or one in the past, is no reset; none is
longer than CAP.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import re
from typing import NamedTuple

from .config import MAX_STATED_SECONDS as CAP  # a week

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)"
_DURATION = re.compile(rf"(?:{_PART})+")
_IN_MESSAGE = re.compile(rf"(?:try again|retry) in ((?:{_PART})+)", re.IGNORECASE)
_DELAY_IN_MESSAGE = re.compile(r"""['"]retryDelay['"]\s*:\s*['"](\d+(?:\.\d+)?)s['"]""")


class Reset(NamedTuple):
    seconds: float  # from now, 0 to CAP
    source: str  # where the provider said it: a header's name, retryDelay, the message


def stated(ex: BaseException, now: float) -> Reset | None:
    "The reset the provider stated in the error (this module's list), or None."
    chain = list(causes(ex))
    for read in (retry_after, _limit_resets, _retry_delay, _message):
        for item in chain:
            found = read(item, now)
            if found is not None:
                return found
    return None


def shown(seconds: float) -> str:
    "A reset as people write durations: ``37s``, ``0.5s``, ``7m54s``, ``2h5m``, ``3d4h``."
    if seconds < 60:
        return f"{round(seconds, 1):g}s"
    whole = math.ceil(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    while parts[0][0] == 0:
        parts.pop(0)
    parts = [part for part in parts[:2] if part[0]]  # the two largest units: 1h, not 1h0m
    return "".join(f"{value}{unit}" for value, unit in parts)


def duration(text: str) -> float | None:
    "Seconds of a Go-style duration (``6m0s``, ``1m26.4s``, ``20ms``), or None."
    text = text.strip()
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in re.findall(_PART, text))


def _bounded(seconds: float | None, source: str) -> Reset | None:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return Reset(min(seconds, CAP), source)


def causes(ex: BaseException):
    "The error and its causes, each once."
    seen = set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        yield ex
        ex = ex.__cause__ or ex.__context__


def _headers(ex: BaseException):
    headers = getattr(getattr(ex, "response", None), "headers", None)
    return headers if hasattr(headers, "get") else None


def _header(headers, name: str) -> str | None:
    try:
        value = headers.get(name)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def retry_after(ex: BaseException, now: float) -> Reset | None:
    "The error's own retry-after-ms or Retry-After header, as a reset."
    headers = _headers(ex)
    if headers is None:
        return None
    millis = _header(headers, "retry-after-ms")
    if millis is not None:
        value = _number(millis)
        return None if value is None else _bounded(value / 1000, "retry-after-ms")
    value = _header(headers, "retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:  # '-0000': UTC, with nothing said about its source
                when = when.replace(tzinfo=datetime.timezone.utc)
            seconds = when.timestamp() - now
        except (TypeError, ValueError, OverflowError, IndexError, OSError):
            return None
    return _bounded(seconds, "retry-after")


def _limit_resets(ex: BaseException, now: float) -> Reset | None:
    headers = _headers(ex)
    if headers is None:
        return None
    spent = []  # (seconds, header) of the reset of each limit with nothing left
    for reset, remaining, read in _LIMIT_HEADERS:
        if (_header(headers, remaining) or "").strip() != "0":
            continue
        text = _header(headers, reset)
        seconds = None if text is None else read(text, now)
        if seconds is not None and math.isfinite(seconds):
            spent.append((seconds, reset))
    if not spent:
        return None
    seconds, name = max(spent)
    return _bounded(seconds, name)


def _until(text: str, now: float) -> float | None:
    "Seconds from now to an RFC 3339 time (``2026-12-06T10:02:41Z``, fractions of any length)."
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text.strip())
    if not match:
        return None
    whole, fraction, zone = match.groups()
    try:
        when = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
        return when.timestamp() + float(fraction or 0) - now
    except (ValueError, OverflowError, OSError):
        return None


# (the reset's header, the header of what is left, how to read the reset)
_LIMIT_HEADERS = [
    (f"x-ratelimit-reset-{kind}", f"x-ratelimit-remaining-{kind}", lambda text, now: duration(text))
    for kind in ("requests", "tokens")
] + [
    (f"anthropic-ratelimit-{kind}-reset", f"anthropic-ratelimit-{kind}-remaining", _until)
    for kind in ("requests", "tokens", "input-tokens", "output-tokens")
]


def _retry_delay(ex: BaseException, now: float) -> Reset | None:
    "Gemini's RetryInfo detail, anywhere in the error's body (a dict, or a list of one)."
    todo, looked = [getattr(ex, "body", None)], 0
    while todo and looked < 200:
        item = todo.pop()
        looked += 1
        if isinstance(item, dict):
            delay = item.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s"):
                seconds = _number(delay[:-1])
                if seconds is not None:
                    return _bounded(seconds, "retryDelay")
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item[:20])
    return None


def _message(ex: BaseException, now: float) -> Reset | None:
    texts = [str(getattr(ex, "message", "") or ""), str(ex)]
    for text in texts:
        match = _DELAY_IN_MESSAGE.search(text)
        if match:
            return _bounded(float(match.group(1)), "retryDelay")
        match = _IN_MESSAGE.search(text)
        if match:
            return _bounded(duration(match.group(1)), "the message")
    return None
