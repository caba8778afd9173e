"""The state of balancers: what holds across prompts and processes (the rotation, limit
windows, cooldowns, prompts in flight, timings, conversation ties, statistics).

This module declares what every backend does (``Store``), the values that cross it (``Choice``,
``Outcome``), its errors, and ``open_store``: the one place a balancer's backend is chosen.
Prompts and every ``llm lb`` command go through it.

- ``sqlite.py``: this machine's file, ``loadbalancers.db`` in the llm folder (the default);
  ``migrations.py``: its schema, one step per version.
- ``redis.py``: a Redis server shared by every machine that names it (``state: redis://...``,
  ``--state``, or LLM_LOADBALANCER_STATE); its scripts are the ``lua/*.lua`` files.
- ``fallback.py``: a state that cannot be used is not llm down: for a Redis server, this
  machine's file answers instead; for the file, this process's own state in memory; with one
  warning, and limits still hold (within the machine, or the process).
- ``leases.py``: a prompt in flight (least-busy) counts while its process renews its lease.
- ``rules.py``: the rules that do not depend on the backend, written once.
- The choice itself is ``selection.choose``, over what a backend read.
"""

from __future__ import annotations

import contextlib
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
    home: tuple[int, float] | None = None  # the prompt prefix's (member, when) as read


class Route(NamedTuple):
    "What the next choice would be, and why, from a state left as it was (``llm lb route``)."

    plan: Plan
    free: dict[int, float]  # {member: when it has room again} of the members at a limit
    cooling: dict[int, float]  # {member: until} cooling down after a guessed time
    blocked: dict[int, float]  # {member: until} inside a reset its provider stated
    now: float


class Outcome(NamedTuple):
    """How one attempt of a member ended, as a store records it. (A NamedTuple rather than a
    frozen dataclass: defining that class cost every ``llm -m lb:NAME`` process 1.2 ms, a
    NamedTuple 0.3 ms, and building one per prompt 1.9 us against 0.6 us.)"""

    error: str | None = None  # "reason: message" of a failure; None for a success
    cooldown: float | None = None  # seconds the failure calls for (the store escalates it)
    stated: bool = False  # the cooldown is the provider's stated reset (Retry-After, quota)
    exact: bool = False  # the provider said when its limit resets: never doubled (resets.py)
    cooled: bool = True  # the member had a cooldown on record, which a success clears
    conversation: str | None = None  # a success ties this conversation to the member
    prefix: str | None = None  # a success makes the member this prompt prefix's (affinity)
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
        demand=None,
        prefix: str | None = None,
    ) -> Choice:
        """Choose the order of members for one prompt (``selection.choose``) and move the
        rotation; a first member with limits (or under least-busy) has its request counted
        there and then: its ticket; under a token limit, the prompt's estimate (``demand``,
        ``estimates.Demand``) is reserved until its outcome. ``tool_turn``: the prompt answers
        tool calls of the conversation's last member, which it goes back to; with ``sticky``
        every turn starts at the member of the first. ``prefix``: the digest of the prompt's
        long prefix (``affinity.prefix``), which goes to the member that last served it while
        ``affinity`` lasts (counted). When no member may be asked now, ``plan.wait`` says."""

    def route(
        self,
        balancer: Balancer,
        *,
        unavailable: frozenset[int] = frozenset(),
        now=None,
        demand=None,
        prefix: str | None = None,
    ) -> Route:
        """The choice a prompt would get now (``choose``: with its ``demand`` and ``prefix``,
        when it is given), and every member's limits and cooldowns, without storing anything:
        the rotation, windows and cooldowns stay as they were."""

    def claim(
        self, balancer: Balancer, member: int, now: float | None = None, demand=None
    ) -> object:
        """Before failing over to a member: False (skip it) when it is at a limit or inside a
        provider's stated reset; otherwise its request is counted as a choice's would be, and
        its ticket (None: nothing was counted)."""

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        """A request that ended without an outcome (the caller stopped reading): not in flight,
        and its reservation freed."""

    def renew(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        """A request in flight still runs: its lease (and its reservation's) lasts
        ``rules.LEASE`` from now."""

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        """One attempt's outcome: statistics, tokens against limits in place of its reservation
        (``rules.spent``), timings; a failure's cooldown (``rules.next_cooldown``); a success
        clears the cooldown, ties the conversation (its first member is kept) and makes the
        member its prompt prefix's."""

    def reset(self, balancer: Balancer) -> None:
        """Start again: rotation, cooldowns, ties and statistics are forgotten (for every
        definition of the name). The windows of the providers' buckets are kept: the requests
        a key received still count against its limits."""

    def retire(self, balancer: Balancer) -> None:
        "A definition was replaced: what it kept is forgotten, as by ``reset``."

    def declare(self, balancer: Balancer, now: float | None = None) -> None:
        """Each member's own limits, declared for its provider's bucket (a choice that counts
        a member's request declares its limits too, renewed hourly)."""

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        "Per-member statistics (``rules.shape_stats``), in the order of the definition."

    def affinity(self, balancer: Balancer, now: float | None = None) -> dict:
        """{routed: prompts sent to their prefix's member, prefixes: prefixes whose tie is
        younger than ``affinity``}."""

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
    """The balancer's store. With ``fallback`` (prompts), a state that cannot be used is
    answered for (one warning per process): a Redis server's by this machine's file, the file's
    by this process's memory, until the process tries it again (TRY_AGAIN). Without
    (commands), the backend alone, whose errors are ``StateUnavailable``."""
    url, key = location(balancer)
    if not fallback:
        return _process.local(balancer.user_dir) if url is None else _process.server(url, key)
    local = _process.guarded(balancer.user_dir)
    if url is None or _process.is_down(url):
        return local
    try:
        shared = _process.server(url, key)
    except Unreachable as ex:
        _process.fall_back(balancer, url, ex)
        return local
    from .fallback import WithFallback

    return WithFallback(shared, local, balancer, _process)


def warn_unavailable(problem: StateUnavailable) -> None:
    "The one warning per process that prompts are answered without any state."
    _process.warn_once(
        "unavailable",
        f"Warning: llm-loadbalancer cannot use its {problem.what} ({problem}); "
        "choosing members without it",
    )


def process_leases():
    "This process's leases of prompts in flight (``leases.Leases``)."
    if _process.leases is None:
        from . import rules
        from .leases import Leases

        _process.leases = Leases(rules.RENEW)
    return _process.leases


def file_of(user_dir: str | None = None) -> str:
    "The state file of an llm folder (None: ``llm.user_dir()``, now)."
    from .sqlite import FILENAME

    if user_dir is None:
        import llm

        user_dir = str(llm.user_dir())
    return os.path.join(user_dir, FILENAME)


# --- what the commands do -------------------------------------------------------------------


COMMAND_WAIT = 1.0  # seconds a command waits for the file's lock before saying it is busy


def reset(balancer: Balancer) -> None:
    """``llm lb reset``: start again, in this machine's file and, for a balancer whose state is
    in Redis, for every machine (``StateUnavailable`` when either cannot be used)."""
    with _command_file(balancer.user_dir) as found:
        found.reset(balancer)
    if location(balancer)[0] is not None:
        open_store(balancer, fallback=False).reset(balancer)


def remove(name: str, balancer: Balancer | None) -> None:
    """``llm lb remove``: forget what this machine's file keeps under the name (whatever the
    definition: ``balancer`` is None when its file is broken), and the state of ``balancer``
    in its Redis server (``StateUnavailable`` when either cannot be used, after trying both)."""
    problem = None
    try:
        with _command_file(None if balancer is None else balancer.user_dir) as found:
            found.forget(name)
    except StateUnavailable as ex:
        problem = ex
    if balancer is not None and location(balancer)[0] is not None:
        open_store(balancer, fallback=False).retire(balancer)  # (its declared limits too)
    if problem is not None:
        raise problem


def saved(new: Balancer, old: Balancer | None = None) -> None:
    """``llm lb save`` (or ``edit``) saved a definition: its members' limits are declared for
    their buckets at once (they apply to every member using the key from now on, whichever is
    asked first), and, when it replaced one with other members, what the old one kept is
    forgotten (its rotation, statistics, cooldowns, ties and declared limits; not the buckets'
    windows). ``StateUnavailable`` when the state cannot be used."""
    problem = None
    for place in ("file", "server"):
        try:
            if place == "file":
                with _command_file(new.user_dir) as found:
                    _told(found, new, old)
            elif location(new)[0] is not None:
                _told(open_store(new, fallback=False), new, old)
        except StateUnavailable as ex:  # the other is told all the same
            problem = problem or ex
    if problem is not None:
        raise problem


def _told(found, new: Balancer, old: Balancer | None) -> None:
    "One store told of a saved definition (``saved``)."
    if old is not None and old.signature != new.signature:
        found.retire(old)
    if any(member.limits for member in new.members):
        found.declare(new)


@contextlib.contextmanager
def _command_file(user_dir: str | None):
    """This machine's state file for one command that changes it (save, edit, reset, remove): a
    connection of its own, which waits for the file's lock at most COMMAND_WAIT, closed when
    the command is done with it, so that it leaves no file open behind it (Windows lets no one
    remove or move an open file). Prompts, and the commands that read the state (stats,
    state, route), keep the process's connection, as before."""
    found = _process.local(user_dir, COMMAND_WAIT)
    try:
        yield found
    finally:
        found.close()


def new_process() -> None:
    """Forget what this process learned (connections, servers found down, warnings given), as
    a new ``llm`` command starts: tests give each of theirs a fresh start. The state files'
    connections are closed, as a process's end closes them (Windows keeps an open file from
    being removed)."""
    global _process
    for kept in _process.files.values():  # (SQLiteStores; folders name the same ones)
        kept.close()
    _process = _Process()


class _Process:
    "What one process keeps of its stores: one per state file and per server, and servers down."

    def __init__(self):
        self.files: dict[str, object] = {}  # path: SQLiteStore
        self.folders: dict[str, object] = {}  # llm folder: SQLiteStore (a prompt's look-up)
        self.guards: dict[str | None, object] = {}  # llm folder: its file, or this process's
        self.memory = None  # the state in memory, when a file cannot be used
        self.leases = None  # the leases of this process's prompts in flight
        self.servers: dict[tuple, object] = {}  # (url, password key name): RedisStore
        self.down: dict[str, float] = {}  # url: when it was found unusable (clock())
        self.warned: set[str] = set()

    def local(self, user_dir: str | None, wait: float | None = None):
        """The store of an llm folder's state file (None: ``llm.user_dir()``, now). ``wait``:
        seconds to wait for its lock, for a command, rather than ``timeout()``."""
        if wait is not None:
            from .sqlite import SQLiteStore

            return SQLiteStore(file_of(user_dir), wait=min(wait, timeout()))
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

    def guarded(self, user_dir: str | None):
        """A prompt's local store: the folder's state file and, when it cannot be used, this
        process's state in memory (limits then hold within the process)."""
        found = self.guards.get(user_dir)
        if found is None:
            from .fallback import WithFallback
            from .sqlite import SQLiteStore

            if self.memory is None:
                self.memory = SQLiteStore(":memory:")
            found = WithFallback(self.local(user_dir), self.memory, None, self)
            if user_dir is not None:
                self.guards[user_dir] = found
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

    def is_down(self, name: str) -> bool:
        """Whether the server (or the file) was found unusable in this process less than
        TRY_AGAIN s ago."""
        since = self.down.get(name)
        return since is not None and clock() - since < TRY_AGAIN

    def fall_back(self, balancer: Balancer | None, name: str, problem: Exception) -> None:
        self.down[name] = clock()
        if balancer is None:  # the file: this process's memory answers
            self.warn_once(
                name,
                f"Warning: llm-loadbalancer cannot use its state file ({problem}); limits, "
                "rotation and cooldowns now hold only within this process",
            )
            return
        self.warn_once(
            name,
            f"Warning: {balancer.model_id}: cannot use its Redis state ({problem}); using "
            f"{LOCAL} until the next llm command",
        )

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self.warned:
            self.warned.add(topic)
            print(message, file=sys.stderr)


_process = _Process()
