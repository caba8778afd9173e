"""Where each balancer's state lives: this machine's SQLite file (``state.py``, the default) or
a Redis server (``redis_state.py``), named by the balancer's ``state:`` or, for every balancer
without one, by LLM_LOADBALANCER_STATE. Both give the same operations (select, claim, finish,
record, reset, stats).

Redis down is not llm down: when the server cannot be used, one warning per process, and the
prompt is answered with this machine's file instead; the next process tries the server again.
"""

from __future__ import annotations

import os
import sys
import time

from . import state
from .config import Balancer, ConfigError, shown_url, state_url

ENV = "LLM_LOADBALANCER_STATE"
KEY_ENV = "LLM_LOADBALANCER_STATE_KEY"  # the stored key holding the password of ENV's server
LOCAL = "this machine's state file"

_connections: dict = {}  # (url, password key name): RedisState
_down: dict = {}  # URL: when it was found unusable in this process (time.monotonic())
_warned: set = set()
TRY_AGAIN = 30.0  # seconds after which a process tries a server it found unusable again


def location(balancer: Balancer) -> tuple[str | None, str | None]:
    "(the Redis URL, the name of the stored key holding its password), or (None, None): local."
    if balancer.state is not None:
        if balancer.state == "local":
            return None, None
        return balancer.state, balancer.state_key
    value = os.environ.get(ENV, "").strip()
    if not value or value == "local":
        return None, None
    try:
        value = state_url(value, ENV)
    except ConfigError as ex:
        _warn_once(ENV, f"Warning: {ex}; using {LOCAL}")
        return None, None
    return value, balancer.state_key or os.environ.get(KEY_ENV) or None


def describe(balancer: Balancer, stored_keys=None) -> str:
    """Where its state lives, as ``llm lb list``, ``stats`` and ``state`` say it. A password
    key that is not a stored key's name is not repeated: it may be the password itself."""
    url, key = location(balancer)
    if url is None:
        return LOCAL
    source = "" if balancer.state else f" (from {ENV})"
    if key:
        if stored_keys is None:
            from .members import load_stored_keys

            stored_keys = load_stored_keys()
        key = f"key {key}" if key in stored_keys else "a key that is not stored (llm keys set)"
    return f"Redis at {shown_url(url)}{source}" + (f", password from {key}" if key else "")


def shared(balancer: Balancer):
    """The balancer's Redis state, without a fallback (for commands: an error is theirs to
    report), or None when its state is local. Raises ``redis_state.Unreachable``."""
    url, key = location(balancer)
    if url is None:
        return None
    found = _connections.get((url, key))
    if found is None:
        from .redis_state import RedisState, Unreachable

        password = None
        if key:
            from .members import load_stored_keys

            password = load_stored_keys().get(key)
            if password is None:  # the name is not repeated: it may be the password itself
                raise Unreachable(
                    "its state_key is not the name of a stored key: store the password with "
                    "'llm keys set NAME' and put state_key: NAME in the balancer"
                )
        found = _connections[(url, key)] = RedisState(url, password)
    return found


def for_balancer(balancer: Balancer):
    "Where a prompt's state goes: the Redis server, falling back to this machine's file."
    url, _ = location(balancer)
    if url is None or _is_down(url):
        return state
    from .redis_state import Unreachable

    try:
        return _WithFallback(shared(balancer), balancer)
    except Unreachable as ex:
        _fall_back(balancer, url, ex)
        return state


def _is_down(url: str) -> bool:
    "Whether the server was found unusable in this process less than TRY_AGAIN seconds ago."
    since = _down.get(url)
    return since is not None and time.monotonic() - since < TRY_AGAIN


def _fall_back(balancer: Balancer, url: str, problem: Exception) -> None:
    _down[url] = time.monotonic()
    _warn_once(
        url,
        f"Warning: {balancer.model_id}: cannot use its Redis state ({problem}); using {LOCAL} "
        "until the next llm command",
    )


def _warn_once(topic: str, message: str) -> None:
    if topic not in _warned:
        _warned.add(topic)
        print(message, file=sys.stderr)


class _WithFallback:
    "A balancer's Redis state; when the server fails, this machine's file from then on."

    def __init__(self, shared_state, balancer: Balancer):
        self.shared = shared_state
        self.balancer = balancer

    def _either(self, name: str, *args, **kwargs):
        from .redis_state import Unreachable

        if isinstance(kwargs.get("ticket"), tuple):  # counted by the file (the server was down)
            return getattr(state, name)(*args, **kwargs)
        if not _is_down(self.shared.url):
            try:
                return getattr(self.shared, name)(*args, **kwargs)
            except Unreachable as ex:
                _fall_back(self.balancer, self.shared.url, ex)
        if "ticket" in kwargs:  # a ticket of the server means nothing to the file
            kwargs["ticket"] = None
        return getattr(state, name)(*args, **kwargs)

    def select(self, *args, **kwargs):
        return self._either("select", *args, **kwargs)

    def claim(self, *args, **kwargs):
        return self._either("claim", *args, **kwargs)

    def record(self, *args, **kwargs):
        return self._either("record", *args, **kwargs)

    def finish(self, balancer, member, ticket, now=None):
        "A ticket of the server means nothing to the file: when the server fails, nothing."
        from .redis_state import Unreachable

        if isinstance(ticket, tuple):  # counted by the file (the server was down)
            return state.finish(balancer, member, ticket, now)
        if _is_down(self.shared.url):
            return
        try:
            self.shared.finish(balancer, member, ticket, now)
        except Unreachable as ex:
            _fall_back(self.balancer, self.shared.url, ex)
