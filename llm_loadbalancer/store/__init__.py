"""The state of balancers: what holds across prompts and processes (the rotation, limit
windows, cooldowns, prompts in flight, timings, conversation ties, statistics).

This module declares what every backend does (``Store``), the values that cross it (``Choice``,
``Outcome``), its errors, and ``open_store``: the one place a balancer's backend is chosen.
Prompts and every ``llm lb`` command go through it.

- ``sqlite.py``: this machine's file, ``loadbalancers.db`` in the llm folder (the default);
  ``migrations.py``: its schema, one step per version.
- ``redis.py``: a Redis server shared by every machine that names it (``state: redis://...``,
  ``--state``, or LLM_LOADBALANCER_STATE); its scripts are the ``lua/*.lua`` files.
- ``fallback.py``: a Redis server that cannot be used is not llm down: this machine's file
  answers instead, with one warning.
- ``rules.py``: the rules that do not depend on the backend, written once.
- The choice itself is ``selection.choose``, over what a backend read.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import NamedTuple, Protocol

from ..config import Balancer, ConfigError, shown_url, state_url
from ..policy import Plan

ENV = "LLM_LOADBALANCER_STATE"
KEY_ENV = "LLM_LOADBALANCER_STATE_KEY"  # the stored key holding the password of ENV's server
TIMEOUT_ENV = "LLM_LOADBALANCER_STATE_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
LOCAL = "this machine's state file"
TRY_AGAIN = 30.0  # seconds after which a process tries a server it found unusable again
clock = time.monotonic  # when a server was found down, and when to try it again (tests move it)


class StateUnavailable(Exception):
    """The state cannot be used (a file corrupt, read-only, locked past the timeout or too new;
    a server down): a prompt is then answered without it, with one warning."""

    what = "state file"  # how the warning names it


class Unreachable(StateUnavailable):
    "A Redis server cannot be used (down, refused, wrong password, redis-py missing)."

    what = "Redis state"


class Busy(StateUnavailable):
    "Every try to store a choice in a Redis server was overtaken by another process's."

    what = "Redis state"


class Choice(NamedTuple):
    "What a store chose for one prompt."

    plan: Plan
    # the first member's request, counted in advance (limits, least-busy): the store's own
    # name for it, handed back with its outcome
    ticket: object
    cooled: frozenset[int]  # members with a cooldown on record (ended or not)
    now: float  # the time of the choice, by the store's clock (a Redis server's: its own)


class Outcome(NamedTuple):
    """How one attempt of a member ended, as a store records it. (A NamedTuple rather than a
    frozen dataclass: defining that class cost every ``llm -m lb:NAME`` process 1.2 ms, a
    NamedTuple 0.3 ms, and building one per prompt 1.9 us against 0.6 us.)"""

    error: str | None = None  # "reason: message" of a failure; None for a success
    cooldown: float | None = None  # seconds the failure calls for (the store escalates it)
    stated: bool = False  # the cooldown is the provider's stated reset (Retry-After, quota)
    cooled: bool = True  # the member had a cooldown on record, which a success clears
    conversation: str | None = None  # a success ties this conversation to the member
    tokens_in: int = 0
    tokens_out: int = 0
    first_chunk: float | None = None  # seconds to the first chunk
    total: float | None = None  # seconds to the end
    streamed: bool = True
    items: int = 0  # the items of an embedding batch


class Store(Protocol):
    "What every backend does; each operation is atomic across processes (and machines)."

    def choose(
        self,
        balancer: Balancer,
        *,
        conversation: str | None = None,
        tool_turn: bool = False,
        unavailable: frozenset[int] = frozenset(),
        stream: bool = True,
        rng=None,
        now: float | None = None,
    ) -> Choice:
        """Choose the order of members for one prompt (``selection.choose``) and move the
        rotation; a first member with limits (or under least-busy) has its request counted
        there and then: its ticket. ``tool_turn``: the prompt answers tool calls of the
        conversation's last member, which it goes back to; with ``sticky`` every turn starts
        at the member of the first. When no member may be asked now, ``plan.wait`` says."""

    def claim(self, balancer: Balancer, member: int, now: float | None = None) -> object:
        """Before failing over to a member with limits: count its request if it has room and is
        not inside a provider's stated reset; its ticket, or None (skip it)."""

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        "A request that ended without an outcome (the caller stopped reading): not in flight."

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        """One attempt's outcome: statistics, tokens against limits, timings; a failure's
        cooldown (``rules.next_cooldown``); a success clears the cooldown and ties the
        conversation (its first member is kept)."""

    def reset(self, balancer: Balancer) -> None:
        "Start again: rotation, cooldowns, limits, ties and statistics are forgotten."

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        "Per-member statistics (``rules.shape_stats``), in the order of the definition."

    def report(self, balancer: Balancer) -> dict:
        "Where the state is and what it holds, for ``llm lb state``."


def timeout() -> float:
    """Seconds to wait for the state (the file's lock, a busy server): the environment's
    LLM_LOADBALANCER_STATE_TIMEOUT, a number from 0 to 3600; anything else is 10."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if math.isfinite(value) and 0 <= value <= 3600 else DEFAULT_TIMEOUT


# --- which store ----------------------------------------------------------------------------


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
        _process.warn_once(ENV, f"Warning: {ex}; using {LOCAL}")
        return None, None
    return value, balancer.state_key or os.environ.get(KEY_ENV) or None


def where(balancer: Balancer, stored_keys=None) -> str:
    """Where its state lives, as ``llm lb list``, ``stats`` and ``state`` say it. A password
    key that is not a stored key's name is not repeated: it may be the password itself."""
    url, key = location(balancer)
    if url is None:
        return LOCAL
    source = "" if balancer.state else f" (from {ENV})"
    if key:
        if stored_keys is None:
            from ..members import load_stored_keys

            stored_keys = load_stored_keys()
        key = f"key {key}" if key in stored_keys else "a key that is not stored (llm keys set)"
    return f"Redis at {shown_url(url)}{source}" + (f", password from {key}" if key else "")


def open_store(balancer: Balancer, *, fallback: bool = True) -> Store:
    """The balancer's store. For a Redis server: with ``fallback`` (prompts), this machine's
    file whenever the server cannot be used (one warning per process); without (commands),
    the server alone, whose errors are ``Unreachable``."""
    url, key = location(balancer)
    if url is None:
        return _process.local(balancer.user_dir)
    if not fallback:
        return _process.server(url, key)
    if _process.is_down(url):
        return _process.local(balancer.user_dir)
    try:
        shared = _process.server(url, key)
    except Unreachable as ex:
        _process.fall_back(balancer, url, ex)
        return _process.local(balancer.user_dir)
    from .fallback import WithFallback

    return WithFallback(shared, _process.local(balancer.user_dir), balancer, _process)


def warn_unavailable(problem: StateUnavailable) -> None:
    "The one warning per process that prompts are answered without the state."
    _process.warn_once(
        "unavailable",
        f"Warning: llm-loadbalancer cannot use its {problem.what} ({problem}); "
        "choosing members without it",
    )


def file_of(user_dir: str | None = None) -> str:
    "The state file of an llm folder (None: ``llm.user_dir()``, now)."
    from .sqlite import FILENAME

    if user_dir is None:
        import llm

        user_dir = str(llm.user_dir())
    return os.path.join(user_dir, FILENAME)


# --- what the commands do -------------------------------------------------------------------


def reset(balancer: Balancer) -> None:
    """``llm lb reset``: start again, in this machine's file and, for a balancer whose state is
    in Redis, for every machine (``Unreachable`` when the server cannot be used)."""
    _process.local(balancer.user_dir).reset(balancer)
    if location(balancer)[0] is not None:
        open_store(balancer, fallback=False).reset(balancer)


def remove(name: str, balancer: Balancer | None) -> None:
    """``llm lb remove``: forget what this machine's file keeps under the name (whatever the
    definition: ``balancer`` is None when its file is broken), and the state of ``balancer``
    in its Redis server. A file that cannot be used is left: a new balancer of the name starts
    afresh in it anyway, its members being others."""
    try:
        _process.local(None if balancer is None else balancer.user_dir).forget(name)
    except StateUnavailable:
        pass
    if balancer is not None and location(balancer)[0] is not None:
        open_store(balancer, fallback=False).reset(balancer)


def new_process() -> None:
    """Forget what this process learned (connections, servers found down, warnings given), as
    a new ``llm`` command starts: tests give each of theirs a fresh start."""
    global _process
    _process = _Process()


class _Process:
    "What one process keeps of its stores: one per state file and per server, and servers down."

    def __init__(self):
        self.files: dict[str, object] = {}  # path: SQLiteStore
        self.folders: dict[str, object] = {}  # llm folder: SQLiteStore (a prompt's look-up)
        self.servers: dict[tuple, object] = {}  # (url, password key name): RedisStore
        self.down: dict[str, float] = {}  # url: when it was found unusable (clock())
        self.warned: set[str] = set()

    def local(self, user_dir: str | None):
        "The store of an llm folder's state file (None: ``llm.user_dir()``, now)."
        found = self.folders.get(user_dir)
        if found is None:
            path = file_of(user_dir)
            found = self.files.get(path)
            if found is None:
                from .sqlite import SQLiteStore

                found = self.files[path] = SQLiteStore(path)
            if user_dir is not None:  # (None may be another folder next time)
                self.folders[user_dir] = found
        return found

    def server(self, url: str, key: str | None):
        found = self.servers.get((url, key))
        if found is None:
            password = None
            if key:
                from ..members import load_stored_keys

                password = load_stored_keys().get(key)
                if password is None:  # the name is not repeated: it may be the password itself
                    raise Unreachable(
                        "its state_key is not the name of a stored key: store the password "
                        "with 'llm keys set NAME' and put state_key: NAME in the balancer"
                    )
            from .redis import RedisStore

            found = self.servers[(url, key)] = RedisStore(url, password)
        return found

    def is_down(self, url: str) -> bool:
        "Whether the server was found unusable in this process less than TRY_AGAIN s ago."
        since = self.down.get(url)
        return since is not None and clock() - since < TRY_AGAIN

    def fall_back(self, balancer: Balancer, url: str, problem: Exception) -> None:
        self.down[url] = clock()
        self.warn_once(
            url,
            f"Warning: {balancer.model_id}: cannot use its Redis state ({problem}); using "
            f"{LOCAL} until the next llm command",
        )

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self.warned:
            self.warned.add(topic)
            print(message, file=sys.stderr)


_process = _Process()
