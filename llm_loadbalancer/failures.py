"""Is a member's error worth failing over, for how long is the member cooled down, and how is
the error shown?

Pure decisions on an exception: the HTTP status is read from the exception's attributes
(``status_code``, ``response.status_code``, ``status``: the openai, anthropic and httpx
shapes), never from message text; connection, timeout and protocol errors are recognised by
type along the exception's cause chain, and so is a header the HTTP client refused to send (a
key with a newline in it).

| failure (before the first chunk)            | fail over | cooldown                        |
|---------------------------------------------|-----------|---------------------------------|
| quota exhausted (429, 400 credit balance)   | yes       | the balancer's quota_cooldown,  |
|                                             |           | or its stated reset if later    |
| 429                                         | yes       | its stated reset (``resets.py``)|
|                                             |           | else the balancer's cooldown    |
| 5xx                                         | yes       | Retry-After, else the balancer's|
| connection error, SDK timeout               | yes       | the balancer's                  |
| no first chunk within the balancer's timeout| yes       | the balancer's                  |
| an answer that cannot be decoded (protocol) | yes       | the balancer's                  |
| 401, 403, 404, missing key                  | yes       | KEY_COOLDOWN (10 minutes)       |
| a key the HTTP client refuses (a newline)   | yes       | KEY_COOLDOWN (10 minutes)       |
| 408, 409                                    | yes       | none                            |
| other 4xx (400, 422 ...), anything else     | no        | none                            |
"""

from __future__ import annotations

import errno
import time
from typing import NamedTuple

import llm

from . import resets
from .config import MAX_SECONDS

KEY_COOLDOWN = 600.0
PROTOCOL_ERROR_NAMES = {
    "JSONDecodeError",
    "UnicodeDecodeError",
    "APIResponseValidationError",
    "DecodingError",
    "SSEDecodeError",
}
CONNECTION_ERROR_NAMES = {
    "APIConnectionError",
    "APITimeoutError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "NetworkError",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "ServerDisconnectedError",
    "ClientConnectorError",
    "ServiceUnavailable",
}
STATUS_WORDS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    408: "request timeout",
    409: "conflict",
    429: "rate limited",
    500: "server error",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


class FirstChunkTimeout(TimeoutError):
    "A member gave no first chunk (no answer, without streaming) within the balancer's timeout."

    def __init__(self, seconds: float, stream: bool = True):
        self.seconds = seconds
        what = "first chunk" if stream else "answer"
        super().__init__(f"no {what} within {seconds:g} s (the balancer's timeout)")


class MemberError(RuntimeError):
    "A member's error that could not be renamed in its own type; ``__cause__`` is the original."


class Failure(NamedTuple):
    reason: str  # one line for the user, e.g. "429 rate limited"
    failover: bool  # another member may not have this problem
    cooldown: float | None  # seconds to skip the member for, or None
    # the provider stated how long (Retry-After, or its quota is spent): a request before then is
    # known to be refused, so the member is waited for, never asked early
    stated: bool = False
    # the provider stated when the limit resets (``resets.py``): kept as said, never doubled
    exact: bool = False


QUOTA_MARKERS = ("insufficient_quota", "credit balance is too low")
REFUSED_HEADER = (
    "the HTTP client refused to send a header: its value (not shown: it may be the key) has a "
    "line break or another character headers cannot carry"
)


def _error_texts(ex: BaseException) -> list[str]:
    "What an error says of itself beside its status: code, type, its body's fields, message."
    texts = [str(getattr(ex, name, "") or "") for name in ("code", "type", "message")]
    body = getattr(ex, "body", None)
    todo = [body]
    while todo and len(texts) < 50:
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item[:10])
        elif isinstance(item, str):
            texts.append(item)
    if not any(texts):
        texts.append(str(ex))
    return [text.lower() for text in texts]


def is_quota_exhausted(ex: BaseException) -> bool:
    """OpenAI's 429 ``insufficient_quota``, Anthropic's "credit balance is too low" (a 400),
    Gemini's 429 ``RESOURCE_EXHAUSTED`` for a per-day quota: a limit that will not clear in
    seconds."""
    texts = _error_texts(ex)
    if any(marker in text for text in texts for marker in QUOTA_MARKERS):
        return True
    joined = " ".join(texts)
    return "resource_exhausted" in joined and ("perday" in joined or "per day" in joined)


def status_of(ex: BaseException) -> int | None:
    for candidate in (
        getattr(ex, "status_code", None),
        getattr(getattr(ex, "response", None), "status_code", None),
        getattr(ex, "status", None),
    ):
        if isinstance(candidate, int) and 100 <= candidate <= 599:
            return candidate
    return None


def retry_after(ex: BaseException, now: float | None = None) -> float | None:
    """Seconds from the response's retry-after-ms or Retry-After header, when it has one that
    makes sense: not a number, not finite or over a day (``inf``, ``1e300``) counts as none."""
    found = resets.retry_after(ex, time.time() if now is None else now)
    return None if found is None or found.seconds > MAX_SECONDS else found.seconds


def _connection_reason(ex: BaseException) -> str | None:
    found = None
    for item in resets.causes(ex):
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        names = {cls.__name__ for cls in type(item).__mro__}
        if isinstance(item, TimeoutError) or names & {"APITimeoutError", "TimeoutException"}:
            found = found or "timed out"
        elif isinstance(item, ConnectionError) or names & CONNECTION_ERROR_NAMES:
            found = found or "connection error"
        if "Connection refused" in str(item) or getattr(item, "errno", None) == errno.ECONNREFUSED:
            return "connection refused"
    return found


def _is_protocol_error(ex: BaseException) -> bool:
    return any(
        {cls.__name__ for cls in type(item).__mro__} & PROTOCOL_ERROR_NAMES
        for item in resets.causes(ex)
    )


def _refused_header(ex: BaseException) -> bool:
    """Whether the HTTP client refused to send a header's value, so sent no request: h11's
    LocalProtocolError (through httpx, in the SDK's APIConnectionError) for a line break, a
    control character or a space at either end; httpx's UnicodeEncodeError for a character
    that is not ASCII: its reason names the header, or (older httpx, as Python 3.10 gets) it was
    raised encoding one. The value is nearly always the member's key."""
    for item in resets.causes(ex):
        names = {cls.__name__ for cls in type(item).__mro__}
        if "LocalProtocolError" in names and str(item).startswith("Illegal header value"):
            return True
        if isinstance(item, UnicodeEncodeError) and (
            "(header " in item.reason or _raised_by_httpx_headers(item)
        ):
            return True
    return False


def _raised_by_httpx_headers(ex: BaseException) -> bool:
    "Whether the exception was raised by a header function of httpx (or httpx2): its last frame."
    tb = ex.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module.startswith("httpx") and "header" in tb.tb_frame.f_code.co_name


def classify(
    ex: BaseException,
    default_cooldown: float,
    quota_cooldown: float = 3600.0,
    now: float | None = None,
) -> Failure:
    "What a member's exception means for the balancer (the table at the top of this module)."
    if isinstance(ex, llm.NeedsKeyException):
        return Failure("missing key", True, KEY_COOLDOWN)
    if _refused_header(ex):  # an APIConnectionError that no retry mends: the key must be set again
        return Failure("bad key", True, KEY_COOLDOWN)
    if isinstance(ex, FirstChunkTimeout):
        return Failure("timed out", True, default_cooldown)
    status = status_of(ex)
    if status in (400, 403, 429) and is_quota_exhausted(ex):
        # a quota's stated reset, when it is later than quota_cooldown: a shorter one is a hint
        # to retry (Gemini's retryDelay for a spent daily quota), not the quota's end
        reason, cooldown = f"{status} quota exhausted", min(quota_cooldown, MAX_SECONDS)
        stated = _stated(reason, ex, now)
        if stated is not None and stated.cooldown > cooldown:
            return stated
        return Failure(reason, True, cooldown, True)
    if status is not None:
        reason = f"{status} {STATUS_WORDS.get(status, 'error')}"
        if status == 429:
            return _stated(reason, ex, now) or Failure(reason, True, default_cooldown)
        if status >= 500:
            wait = retry_after(ex)
            if wait is None:
                return Failure(reason, True, default_cooldown)
            return Failure(reason, True, wait, True)
        if status in (401, 403, 404):
            return Failure(reason, True, KEY_COOLDOWN)
        if status in (408, 409):
            return Failure(reason, True, None)
        return Failure(reason, False, None)
    connection = _connection_reason(ex)
    if connection:
        return Failure(connection, True, default_cooldown)
    if _is_protocol_error(ex):
        return Failure("protocol error: the answer could not be decoded", True, default_cooldown)
    # The exception's own text is not the reason: it may hold a key (Illegal header value
    # b'Bearer sk-...'); callers keep it only redacted, through one_line(ex, secrets).
    return Failure("error", False, None)


def _stated(reason: str, ex: BaseException, now: float | None) -> Failure | None:
    """A limit or quota whose reset the provider stated (``resets.stated``): the member is out
    until then, and the reason says when and where it was said."""
    reset = resets.stated(ex, time.time() if now is None else now)
    if reset is None:
        return None
    return Failure(
        f"{reason}, reset in {resets.shown(reset.seconds)} stated by the provider in "
        f"{reset.source}",
        True,
        reset.seconds,
        True,
        True,
    )


def one_line(ex: BaseException, secrets=(), limit: int = 200) -> str:
    """The first line of an error, without any secret in it, shortened. A refused header's own
    text is never shown: it holds the value, escaped (b'Bearer sk-...\\n')."""
    if _refused_header(ex):
        text = REFUSED_HEADER
    else:
        text = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    for secret in secrets:
        for form in _written(secret or ""):
            text = text.replace(form, "***")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _written(secret: str) -> list[str]:
    """How an error's text may hold a secret: as it is, escaped as a repr escapes it, or one of
    its lines (the first line of an error ends where a key with a newline breaks); longest first."""
    forms = {secret, repr(secret)[1:-1], repr(secret.encode(errors="backslashreplace"))[2:-1]}
    forms.update(line.strip() for line in secret.splitlines())
    return sorted(filter(None, forms), key=len, reverse=True)


def renamed(ex: Exception, message: str) -> Exception:
    """The member's exception, to raise ``from ex``, saying ``message`` instead of its own text:
    of the same type with the same attributes (``status_code``, ``response`` ...) where that
    type allows it, so that callers who catch it by type still do; a ``MemberError`` otherwise."""
    cls = type(ex)
    try:
        new = cls.__new__(cls)
        new.__dict__.update(getattr(ex, "__dict__", {}))
        new.args = (message,)
        if isinstance(ex, OSError):
            new.errno = ex.errno  # kept where C keeps it, not in __dict__
        if isinstance(getattr(ex, "message", None), str):
            new.message = message
        if str(new) == message:
            return new
    except Exception:
        pass
    return MemberError(message)
