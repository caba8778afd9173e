"""What holds across prompts and processes: rotation, cooldowns, conversation ties, statistics.

One SQLite file, ``loadbalancers.db`` in the llm folder a balancer was read from
(``llm.user_dir()``), in WAL mode with a busy timeout. Each selection is one write transaction
(``BEGIN IMMEDIATE``), and so is each outcome, so concurrent ``llm`` processes take turns
exactly. When the file cannot be used, callers get ``StateUnavailable`` and carry on
without it (``model.py`` warns once).
"""

from __future__ import annotations

import functools
import math
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

import llm

from . import limits
from .config import MAX_SECONDS, Balancer
from .policy import Plan
from .selection import (
    IN_FLIGHT_HOURS,
    RECENT_HOURS,
    RECENT_TIMINGS,
    choose,
    counted_ahead,
    free_at,
    in_flight,
    of_kind,
    spread,
)

FILENAME = "loadbalancers.db"
TIMEOUT_ENV = "LLM_LOADBALANCER_STATE_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
AFFINITY_DAYS = 30
PRUNE_EVERY = 100

# Each step takes the file from version N to N + 1 (``pragma user_version``); a file made before
# versions were kept (0.1.0, version 0) has the tables of step 1 already, which it creates only
# where they are missing. Steps run in one write transaction, so concurrent processes upgrade
# a file once.
SCHEMA_V1 = """
create table if not exists rotation (
    balancer text primary key,
    signature text not null,
    position integer not null default 0
);
create table if not exists cooldowns (
    balancer text not null,
    member integer not null,
    until real not null,
    reason text,
    primary key (balancer, member)
);
create table if not exists stats (
    balancer text not null,
    member integer not null,
    requests integer not null default 0,
    successes integer not null default 0,
    failures integer not null default 0,
    last_used real,
    last_error text,
    primary key (balancer, member)
);
create table if not exists affinity (
    balancer text not null,
    conversation text not null,
    first_member integer not null,
    last_member integer not null,
    updated real not null,
    primary key (balancer, conversation)
);
create index if not exists affinity_updated on affinity (updated);
update cooldowns set until = 0 where until is null or until != until;
update cooldowns set until = min(until, strftime('%s', 'now') + {max_seconds});
"""
# 1 -> 2: limits, known and escalating cooldowns, tokens and timings (issues 10, 11). One row
# per request sent, with its timings (statistics, lowest-latency) and, for a member with limits
# or under least-busy, made when it is chosen (in flight until it ends); ``seq`` numbers a
# member's requests, so that a window's count is two index look-ups, not a scan. ``spent``
# records the tokens a member reported, with their running total (``cum``) for the same
# reason. Rows older than the longest window (a day) are pruned as new ones are recorded.
SCHEMA_V2 = """
alter table cooldowns add column known integer not null default 0;
alter table cooldowns add column length real not null default 0;
alter table stats add column input_tokens integer not null default 0;
alter table stats add column output_tokens integer not null default 0;
create table requests (
    id integer primary key,
    balancer text not null,
    member integer not null,
    at real not null,
    tokens integer not null default 0,
    first_chunk real,
    total real,
    pid integer,
    streamed integer,
    seq integer
);
create index requests_member_at on requests (balancer, member, at);
create index requests_in_flight on requests (balancer) where total is null;
create table spent (
    id integer primary key,
    balancer text not null,
    member integer not null,
    at real not null,
    tokens integer not null,
    cum integer not null
);
create index spent_member_at on spent (balancer, member, at);
"""
# 2 -> 3: the items of an embedding balancer's batches (issue 13)
SCHEMA_V3 = """
alter table stats add column items integer not null default 0;
"""
# 3 -> 4 (issue 10's cost budget): fewer pages written per prompt. Requests and token reports
# are kept in the order of their index (without rowid): one page each, not two. A request's row
# is named by (balancer, member, at, id): a request counted against limits has its number
# (``seq``) for id, so that requests chosen at the same time stay in order; one recorded only
# when it ended, a random id. The row carries its outcome (tokens, error, items, when it
# ended); ``stats`` holds the totals of the rows pruned after a day (and of those it counted
# before version 4: ``counted``), which ``stats()`` adds to the others.
SCHEMA_V4 = """
create table requests_v4 (
    balancer text not null,
    member integer not null,
    at real not null,
    id integer not null,
    first_chunk real,
    total real,
    pid integer,
    streamed integer,
    seq integer,
    input_tokens integer not null default 0,
    output_tokens integer not null default 0,
    error text,
    items integer not null default 0,
    counted integer not null default 0,
    ended real,
    primary key (balancer, member, at, id)
) without rowid;
insert into requests_v4 (balancer, member, at, id, first_chunk, total, pid, streamed, seq, counted)
    select balancer, member, at, id, first_chunk, total, pid, streamed, seq, 1 from requests;
drop table requests;
alter table requests_v4 rename to requests;
create index requests_in_flight on requests (balancer) where total is null;
create table spent_v4 (
    balancer text not null,
    member integer not null,
    at real not null,
    cum integer not null,
    tokens integer not null,
    primary key (balancer, member, at, cum)
) without rowid;
insert or ignore into spent_v4 (balancer, member, at, cum, tokens)
    select balancer, member, at, cum, tokens from spent;
drop table spent;
alter table spent_v4 rename to spent;
"""
# 4 -> 5 (issue 10's cost budget): an outcome is a row of its own, so that recording it writes
# one row (after reading the member's last), not an update of its request's row and a row for
# its tokens. ``requests`` keeps the requests counted in advance (limits, least-busy), each
# named by its number; ``outcomes`` keeps what each attempt ended with, numbered in the order
# they ended (``n``), with the running total of the tokens counted against limits (``cum``),
# which replaces ``spent``. The outcomes a version-4 file kept, and its token reports, become
# rows of ``outcomes``, numbered and summed in the order they came.
SCHEMA_V5 = """
create table requests_v5 (
    balancer text not null,
    member integer not null,
    at real not null,
    seq integer not null,
    pid integer,
    total real,
    primary key (balancer, member, at, seq)
) without rowid;
insert or ignore into requests_v5 (balancer, member, at, seq, pid, total)
    select balancer, member, at, seq, pid, total from requests where seq is not null;
create table outcomes (
    balancer text not null,
    member integer not null,
    at real not null,
    n integer not null,
    tokens integer not null default 0,
    cum integer not null default 0,
    first_chunk real,
    total real,
    streamed integer,
    input_tokens integer not null default 0,
    output_tokens integer not null default 0,
    error text,
    items integer not null default 0,
    counted integer not null default 0,
    primary key (balancer, member, at, n)
) without rowid;
insert into outcomes (balancer, member, at, n, tokens, cum, first_chunk, total, streamed,
        input_tokens, output_tokens, error, items, counted)
    select balancer, member, at, row_number() over running, tokens, sum(tokens) over running,
        first_chunk, total, streamed, input_tokens, output_tokens, error, items, counted
    from (
        select balancer, member, coalesce(ended, at) as at, 0 as tokens, first_chunk, total,
            streamed, input_tokens, output_tokens, error, items, counted, 0 as report, id as tie
        from requests where streamed is not null
        union all
        select balancer, member, at, tokens, null, null, null, 0, 0, null, 0, 0, 1, cum
        from spent
    )
    window running as (partition by balancer, member order by at, report, tie);
drop table requests;
drop table spent;
alter table requests_v5 rename to requests;
create index requests_in_flight on requests (balancer) where total is null;
"""
MIGRATIONS = (
    SCHEMA_V1.format(max_seconds=int(MAX_SECONDS)),
    SCHEMA_V2,
    SCHEMA_V3,
    SCHEMA_V4,
    SCHEMA_V5,
)
VERSION = len(MIGRATIONS)


class StateUnavailable(Exception):
    "The state file cannot be used (corrupt, read-only, locked past the timeout, too new)."

    what = "state file"  # how the warning names it


_paths: dict = {}


def path() -> Path:
    "The state file in llm.user_dir(), found once per LLM_USER_PATH value."
    user_path = os.environ.get("LLM_USER_PATH")
    found = _paths.get(user_path)
    if found is None:
        found = _paths[user_path] = llm.user_dir() / FILENAME
    return found


def file_of(balancer: Balancer) -> str:
    "The balancer's state file: in the llm folder its definition was read from."
    if balancer.user_dir is None:
        return str(path())
    found = _files.get(balancer.user_dir)
    if found is None:
        found = _files[balancer.user_dir] = os.path.join(balancer.user_dir, FILENAME)
    return found


_files: dict[str, str] = {}
_lock = threading.Lock()
_connections: dict[str, sqlite3.Connection] = {}


def timeout() -> float:
    """Seconds to wait for the file's lock: LLM_LOADBALANCER_STATE_TIMEOUT, a number from 0 to
    3600; anything else (inf, nan, -5, text) is the default, 10."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if math.isfinite(value) and 0 <= value <= 3600 else DEFAULT_TIMEOUT


def _connect(file: str) -> sqlite3.Connection:
    db = _connections.get(file)
    if db is None:
        db = sqlite3.connect(file, timeout=timeout(), isolation_level=None, check_same_thread=False)
        try:
            # A new file gets small pages: a prompt rewrites a few pages, and every byte of them
            # goes to the disk at the next checkpoint (an existing file keeps its page size).
            db.execute("pragma page_size=1024")
            _wal(db)
            db.execute("pragma synchronous=normal")
            _upgrade(db)
        except BaseException:
            db.close()
            raise
        _connections[file] = db
    return db


_pause = time.sleep  # (tests replace it)


def _wal(db) -> None:
    """Put the file in WAL mode. A new file needs a moment to itself for that: while another
    process is creating it too, SQLite refuses at once instead of waiting (its busy timeout does
    not apply), so this tries again until the timeout."""
    deadline = time.monotonic() + timeout()
    while True:
        try:
            db.execute("pragma journal_mode=wal")
            return
        except sqlite3.OperationalError as ex:
            if "locked" not in str(ex) or time.monotonic() >= deadline:
                raise
            _pause(0.005)


def _upgrade(db) -> None:
    "Bring the file to VERSION, one step at a time, in one write transaction."
    if db.execute("pragma user_version").fetchone()[0] == VERSION:
        return
    db.execute("begin immediate")
    try:
        version = db.execute("pragma user_version").fetchone()[0]
        if version > VERSION:
            raise StateUnavailable(
                f"its tables are version {version}, from a newer llm-loadbalancer than this one "
                f"(which knows version {VERSION}): upgrade llm-loadbalancer"
            )
        for step in MIGRATIONS[version:]:
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"pragma user_version = {VERSION}")
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")


class transaction:
    """``with transaction(file) as db``: a connection to the state file (llm.user_dir()'s by
    default) inside one transaction; every failure of the file becomes StateUnavailable. (A
    class rather than a generator: a prompt enters two.)"""

    def __init__(self, file: str | None = None, write: bool = True):
        self.file = str(path()) if file is None else file
        self.write = write

    def __enter__(self) -> sqlite3.Connection:
        _lock.acquire()
        try:
            self.db = _connect(self.file)
            self.db.execute("begin immediate" if self.write else "begin")
        except BaseException as ex:
            _lock.release()
            self._raise_unavailable(ex)
            raise
        return self.db

    def __exit__(self, kind, ex, traceback) -> None:
        try:
            self.db.execute("commit" if kind is None else "rollback")
        except BaseException as problem:
            self._raise_unavailable(problem)
            raise
        else:
            if ex is not None:
                self._raise_unavailable(ex)
        finally:
            _lock.release()

    def _raise_unavailable(self, ex: BaseException) -> None:
        "A failure of the file, as StateUnavailable; anything else is left as it is."
        if isinstance(ex, StateUnavailable):
            raise StateUnavailable(f"{self.file}: {ex}") from ex
        if isinstance(ex, (sqlite3.Error, OSError)):
            _connections.pop(self.file, None)
            hint = ""
            if "not a database" in str(ex) or "malformed" in str(ex):
                hint = (
                    ": the file is damaged; move it away (rotation, cooldowns and statistics "
                    "start afresh)"
                )
            raise StateUnavailable(f"{self.file}: {ex}{hint}") from ex


def _sync_signature(db, balancer: Balancer) -> tuple[int, list]:
    """The stored rotation position and the cooldowns on record (member, until, known), read at
    once; a changed member list starts everything again (no cooldowns)."""
    rotation, cooldowns = None, []
    for row in db.execute(
        "select -1, signature, position from rotation where balancer = ?1 "
        "union all select member, until, known from cooldowns where balancer = ?1",
        [balancer.name],
    ).fetchall():
        if row[0] == -1:
            rotation = row[1:]
        else:
            cooldowns.append(row)
    if rotation is not None and rotation[0] == balancer.signature:
        return rotation[1], cooldowns
    _clear(db, balancer.name)
    db.execute(
        "insert into rotation (balancer, signature, position) values (?, ?, 0)",
        [balancer.name, balancer.signature],
    )
    return 0, []


def _clear(db, name: str) -> None:
    for table in ("rotation", "cooldowns", "stats", "affinity", "requests", "outcomes"):
        db.execute(f"delete from {table} where balancer = ?", [name])


class Choice(NamedTuple):
    plan: Plan
    # the first member's request, counted against its limits in advance: (at, seq) of its row
    # in the file, a Redis server's own name for it
    ticket: tuple | str | None
    cooled: frozenset[int]  # members with a cooldown on record (ended or not)
    now: float  # the time of the choice, by the backend's clock (a Redis server's: its own)


class _FileKnown:
    "What the state file knows of a balancer (``selection.Known``), read in one transaction."

    def __init__(self, db, balancer: Balancer, now: float, cooldowns):
        self.db, self.balancer, self.now = db, balancer, now
        self.cooling, self.blocked, self.cooled = _cooldowns(cooldowns, now)
        self.tie = self.busy = self.latency = None
        self.position = 0
        self.last_requests: dict[int, tuple] = {}  # (time, number) of each member's last request

    def totals(self, member: int) -> dict[float, tuple[int, int]]:
        windows, sql = _window_query(tuple(self.balancer.members[member].limits))
        arguments = [self.balancer.name, member] + [self.now - window for window in windows]
        row = self.db.execute(sql, arguments).fetchone()
        # per table (requests, then outcomes with a token limit): the newest row's time and
        # running number, then the running number before each window
        width = len(windows) + 2
        tables = ("requests", "outcomes")[: len(row) // width]
        if any(at is not None and at > self.now for at in row[::width]):  # the clock went back
            for table, at in zip(tables, row[::width]):
                _after_now(self.db, table, self.balancer.name, member, at, self.now)
            row = self.db.execute(sql, arguments).fetchone()
        self.last_requests[member] = row[:2]
        requests = _spans(row[1:width])
        tokens = _spans(row[width + 1 :]) if len(row) > width else [0] * len(windows)
        return dict(zip(windows, zip(requests, tokens)))

    def events(self, member: int, since: float):
        return _events(self.db, self.balancer.name, member, since)


def _spans(numbers) -> list[int]:
    "From a running number's newest value and its value before each window: each window's count."
    last, *befores = numbers
    return [0 if last is None or before is None else last - before for before in befores]


def select(
    balancer: Balancer,
    *,
    conversation: str | None = None,
    tool_turn: bool = False,
    unavailable: frozenset[int] = frozenset(),
    stream: bool = True,
    rng=None,
    now: float | None = None,
) -> Choice:
    """Choose the order of members for one prompt and move the rotation, in one transaction;
    a first member with limits has its request counted against them there and then (its
    ticket). When no member may be asked now, ``plan.wait`` says which to wait for.

    ``tool_turn``: the prompt carries tool results for the previous turn of ``conversation``,
    which goes back to the member that made the calls. With ``sticky`` every turn of a
    conversation starts at the member that answered its first turn.
    """
    with transaction(file_of(balancer)) as db:
        now = time.time() if now is None else now  # in the lock: rows in the order of their times
        position, cooldowns = _sync_signature(db, balancer)
        known = _FileKnown(db, balancer, now, cooldowns)
        known.position = position
        if conversation and (tool_turn or balancer.sticky):
            known.tie = db.execute(
                "select first_member, last_member from affinity "
                "where balancer = ? and conversation = ?",
                [balancer.name, conversation],
            ).fetchone()
        if balancer.policy == "least-busy":
            known.busy = _in_flight(db, balancer, now)
        elif balancer.policy == "lowest-latency":
            known.latency = _latencies(db, balancer, now, stream)
        result = choose(
            balancer, known, tool_turn=tool_turn, unavailable=unavailable, rng=rng, now=now
        )
        if result.position != position:
            db.execute(
                "update rotation set position = ? where balancer = ?",
                [result.position, balancer.name],
            )
        ticket = None
        if result.order and counted_ahead(balancer, result.order[0]):
            first = result.order[0]
            ticket = _sent(db, balancer, first, now, known.last_requests.get(first))
        return Choice(result, ticket, known.cooled, now)


def _in_flight(db, balancer: Balancer, now: float) -> dict[int, int]:
    """Prompts in flight per member, across processes: chosen, not ended, younger than
    IN_FLIGHT_HOURS, of a process that is still running (a killed one's stop counting)."""
    rows = db.execute(
        "select member, at, pid from requests where balancer = ? and total is null and at > ?",
        [balancer.name, now - IN_FLIGHT_HOURS * 3600],
    )
    return in_flight(rows, now, alive)


def alive(pid) -> bool:
    "Whether the process of this machine with that id still runs."
    if pid is None or pid == os.getpid():
        return pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, and belongs to someone else
        return True
    return True


def _latencies(db, balancer: Balancer, now: float, stream: bool) -> dict[int, float]:
    """Each member's median recent time to first chunk (streaming prompts) or total time (not
    streaming); members without recent timings are left out."""
    column = "first_chunk" if stream else "total"
    found = {}
    for member in range(len(balancer.members)):
        values = [
            row[0]
            for row in db.execute(
                f"select {column} from outcomes where balancer = ? and member = ? "
                f"and streamed = ? and {column} > 0 and at > ? order by at desc limit ?",
                [balancer.name, member, int(stream), now - RECENT_HOURS * 3600, RECENT_TIMINGS],
            )
        ]
        if values:
            found[member] = spread(values)["median"]
    return found


def claim(balancer: Balancer, member: int, now: float | None = None) -> tuple | None:
    """Before failing over to a member with limits: count its request if it has room under
    them and is not inside a provider's Retry-After; its ticket, or None (skip it)."""
    with transaction(file_of(balancer)) as db:
        now = time.time() if now is None else now  # in the lock: rows in the order of their times
        cooldowns = db.execute(
            "select member, until, known from cooldowns where balancer = ? and member = ?",
            [balancer.name, member],
        ).fetchall()
        known = _FileKnown(db, balancer, now, cooldowns)
        if member in known.blocked or free_at(balancer, known, member, now) is not None:
            return None
        return _sent(db, balancer, member, now, known.last_requests.get(member))


def _cooldowns(rows, now: float):
    """From the cooldowns on record (member, until, known): {member: until} cooling down after a
    guessed time, those the provider gave (known), and every member with a cooldown on record,
    ended or not (what a success clears)."""
    cooling, blocked, cooled = {}, {}, set()
    for index, until, known in rows:
        cooled.add(index)
        if until > now:
            (blocked if known else cooling)[index] = min(until, now + MAX_SECONDS)
    return cooling, blocked, frozenset(cooled)


@functools.lru_cache(maxsize=32)
def _window_query(names: tuple[str, ...]) -> tuple[list[float], str]:
    """The windows of these limits, and one statement giving, for requests (and tokens, with a
    token limit), the newest row's time and running number and, per window, the running number
    just before the oldest row inside it. Parameters: balancer, member, each window's start."""
    windows = sorted({limits.WINDOWS[name] for name in names})
    # (table, running number, what a row adds to it, what orders rows of the same time: the
    # last column of the table's key, which the running number follows)
    tables = [("requests", "seq", "1", "seq")]
    if any(name.startswith("t") for name in names):
        tables.append(("outcomes", "cum", "tokens", "n"))
    parts = []
    for table, running, added, tie in tables:
        where = f"from {table} where balancer = ?1 and member = ?2"
        for newest in ("at", running):
            parts.append(f"(select {newest} {where} order by at desc, {tie} desc limit 1)")
        for number in range(len(windows)):
            parts.append(
                f"(select {running} - {added} {where} and at > ?{number + 3} "
                f"order by at, {tie} limit 1)"
            )
    return windows, "select " + ", ".join(parts)


def _events(db, name: str, member: int, since: float):
    "(time, 0) of each request, and (time, tokens) of each report, of a member since ``since``."
    requests = db.execute(
        "select at, 0 from requests where balancer = ? and member = ? and at > ?",
        [name, member, since],
    ).fetchall()
    spent = db.execute(
        "select at, tokens from outcomes where balancer = ? and member = ? and at > ? "
        "and tokens > 0",
        [name, member, since],
    ).fetchall()
    return requests, spent


def _after_now(db, table: str, name: str, member: int, last_at, now: float) -> None:
    """When the member's last row is dated after now (the clock was set back, or had been ahead),
    its rows dated after now are dated now: they stay in the order of their running numbers and
    are counted against limits for one window from now, never for longer."""
    if last_at is not None and last_at > now:
        db.execute(  # (or replace: rows numbered alike by an older version become one)
            f"update or replace {table} set at = ? where balancer = ? and member = ? and at > ?",
            [now, name, member, now],
        )


def _sent(db, balancer: Balancer, member: int, now: float, last=None) -> tuple[float, int]:
    """A request, chosen now, numbered after the member's last (``last``: its (time, number),
    when the choice read them already; the number orders requests chosen at the same time); its
    row's (at, seq). Under least-busy it is in flight (no total yet) until it ends; otherwise
    its total is 0, which keeps it out of the in-flight index."""
    if last is None:
        last = db.execute(
            "select at, seq from requests where balancer = ? and member = ? "
            "order by at desc, seq desc limit 1",
            [balancer.name, member],
        ).fetchone() or (None, None)
    last_at, last_seq = last
    _after_now(db, "requests", balancer.name, member, last_at, now)
    seq = (last_seq or 0) + 1
    db.execute(
        "insert into requests (balancer, member, at, seq, pid, total) values (?, ?, ?, ?, ?, ?)",
        [
            balancer.name,
            member,
            now,
            seq,
            os.getpid(),
            None if balancer.policy == "least-busy" else 0.0,
        ],
    )
    return now, seq


def finish(balancer: Balancer, member: int, ticket: tuple, now: float | None = None) -> None:
    "A request that ended without a record (the caller stopped reading): no longer in flight."
    if balancer.policy != "least-busy":  # (only least-busy counts requests in flight)
        return
    with transaction(file_of(balancer)) as db:
        _ended(db, balancer.name, member, ticket, time.time() if now is None else now)


def _ended(db, name: str, member: int, ticket: tuple, now: float) -> None:
    """A request in flight (least-busy) is no longer: it took from its start until now. (A row
    dated again since, after a clock step, is earlier than its ticket says, with its number.)"""
    at, seq = ticket
    for match in ("at = ?", "at <= ?"):
        ended = db.execute(
            f"update requests set total = ? - at where balancer = ? and member = ? and {match} "
            "and seq = ? and total is null",
            [now, name, member, at, seq],
        ).rowcount
        if ended:
            return


def record(
    balancer: Balancer,
    member: int,
    *,
    ticket: tuple | None = None,
    error: str | None = None,
    cooldown: float | None = None,
    known: bool = False,
    cooled: bool = True,
    conversation: str | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
    first_chunk: float | None = None,
    total: float | None = None,
    streamed: bool = True,
    items: int = 0,
    now: float | None = None,
) -> None:
    """Record one attempt: its outcome, tokens and timings in the statistics and against its
    limits; after a failure a cooldown (twice the last one when the member fails again right
    after a cooldown, up to the cap; a success resets that); for a success the member now
    tied to the conversation. ``ticket``: its request's row, made in advance (limits;
    least-busy, which counts it in flight until now); ``cooled``: whether it had a cooldown
    on record, which a success clears; ``items``: the items of an embedding batch."""
    name = balancer.name
    tokens_in, tokens_out = tokens[0] or 0, tokens[1] or 0
    with transaction(file_of(balancer)) as db:
        now = time.time() if now is None else now  # in the lock: rows in the order of their times
        if ticket is not None and balancer.policy == "least-busy":
            _ended(db, name, member, ticket, now)
        # numbered after the member's last outcome, its tokens added to their running total
        last_at, number, cum = db.execute(
            "select at, n, cum from outcomes where balancer = ? and member = ? "
            "order by at desc, n desc limit 1",
            [name, member],
        ).fetchone() or (None, 0, 0)
        _after_now(db, "outcomes", name, member, last_at, now)
        spent = tokens_in + tokens_out
        db.execute(
            "insert into outcomes (balancer, member, at, n, tokens, cum, first_chunk, total, "
            "streamed, input_tokens, output_tokens, error, items) "
            "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                name,
                member,
                now,
                number + 1,
                spent,
                cum + spent,
                first_chunk,
                total,
                int(streamed),
                tokens_in,
                tokens_out,
                error,
                items,
            ],
        )
        prune = random.random() * PRUNE_EVERY < 1
        if prune:  # this member's rows older than a day: into the totals
            _fold(db, name, member, now - limits.LONGEST)
        if cooldown:
            row = db.execute(
                "select length from cooldowns where balancer = ? and member = ?", [name, member]
            ).fetchone()
            if row is not None:  # it failed again since its last cooldown: twice as long
                cooldown = max(cooldown, 2 * row[0])
            cooldown = min(cooldown, MAX_SECONDS)  # every cooldown is capped, whatever its source
            db.execute(
                "insert into cooldowns (balancer, member, until, reason, known, length) "
                "values (?, ?, ?, ?, ?, ?) on conflict do update set until = excluded.until, "
                "reason = excluded.reason, known = excluded.known, length = excluded.length",
                [name, member, now + cooldown, error, int(known), cooldown],
            )
        elif error is None and cooled:
            db.execute("delete from cooldowns where balancer = ? and member = ?", [name, member])
        if prune:  # ties older than AFFINITY_DAYS are forgotten (indexed)
            db.execute("delete from affinity where updated < ?", [now - AFFINITY_DAYS * 86400])
        if error is None and conversation:
            db.execute(
                "insert into affinity (balancer, conversation, first_member, last_member, "
                "updated) values (?, ?, ?, ?, ?) on conflict do update set "
                "last_member = excluded.last_member, updated = excluded.updated",
                [name, conversation, member, member, now],
            )


# The outcomes of a member's attempts, as the columns of ``stats``: from its rows not yet counted
# (a version-4 file's token reports are rows without an outcome: ``streamed`` is null)
OUTCOMES = (
    "count(*), sum(error is null), sum(error is not null), max(at), "
    "(select error from outcomes as later where later.balancer = outcomes.balancer "
    "and later.member = outcomes.member and later.error is not null and later.counted = 0 "
    "and later.at < ?3 order by later.at desc, later.n desc limit 1), "
    "sum(input_tokens), sum(output_tokens), sum(items) "
    "from outcomes where balancer = ?1 and member = ?2 and at < ?3 "
    "and streamed is not null and counted = 0"
)


def _fold(db, name: str, member: int, before: float) -> None:
    "Add the outcomes of a member's rows older than ``before`` to its totals; drop the rows."
    db.execute(
        "insert into stats (balancer, member, requests, successes, failures, last_used, "
        f"last_error, input_tokens, output_tokens, items) select ?1, ?2, {OUTCOMES} "
        "group by balancer on conflict do update set "
        "requests = requests + excluded.requests, successes = successes + excluded.successes, "
        "failures = failures + excluded.failures, "
        "last_used = max(coalesce(last_used, 0), excluded.last_used), "
        "last_error = coalesce(excluded.last_error, last_error), "
        "input_tokens = input_tokens + excluded.input_tokens, "
        "output_tokens = output_tokens + excluded.output_tokens, items = items + excluded.items",
        [name, member, before],
    )
    for table in ("requests", "outcomes"):
        db.execute(
            f"delete from {table} where balancer = ? and member = ? and at < ?",
            [name, member, before],
        )


def reset(name: str) -> None:
    "Start the rotation again at the first member and forget cooldowns, ties and statistics."
    with transaction() as db:
        _clear(db, name)


RECENT = 100  # the requests per member that timings are taken over


def stats(balancer: Balancer, now: float | None = None) -> list[dict]:
    """Per-member statistics, one dict per member in the order of the definition: counts,
    tokens, time to first chunk and total time (median and 95th percentile, in seconds, over
    its RECENT latest requests), its use of each limit in the current window, and cooldown."""
    now = time.time() if now is None else now
    name = balancer.name
    rows, cooling, events, timings = {}, {}, {}, {}
    with transaction(file_of(balancer), write=False) as db:
        row = db.execute("select signature from rotation where balancer = ?", [name]).fetchone()
        if row is not None and row[0] == balancer.signature:
            rows = {
                r[0]: r[1:]
                for r in db.execute(
                    "select member, requests, successes, failures, last_used, last_error, "
                    "input_tokens, output_tokens, items from stats where balancer = ?",
                    [name],
                )
            }
            for index in range(len(balancer.members)):  # and the rows not yet in the totals
                live = db.execute(f"select {OUTCOMES}", [name, index, math.inf]).fetchone()
                if live[0]:
                    rows[index] = _added(rows.get(index), live)
            cooling = {
                r[0]: r[1:]
                for r in db.execute(
                    "select member, until, reason, known from cooldowns "
                    "where balancer = ? and until > ?",
                    [name, now],
                )
            }
            for index, member in enumerate(balancer.members):
                if member.limits:
                    events[index] = _events(db, name, index, now - limits.LONGEST)
                timings[index] = db.execute(
                    "select first_chunk, total from outcomes where balancer = ? and member = ? "
                    "and total > 0 order by at desc limit ?",
                    [name, index, RECENT],
                ).fetchall()
    return shape_stats(balancer, rows, cooling, events, timings, now)


def _added(folded, live) -> tuple:
    "A member's totals (``stats``'s columns) and the outcomes of its rows not yet in them."
    if folded is None:
        return tuple(live)
    requests, successes, failures, last_used, last_error, tokens_in, tokens_out, items = folded
    return (
        requests + live[0],
        successes + live[1],
        failures + live[2],
        max(last_used or 0, live[3]),
        live[4] or last_error,
        tokens_in + live[5],
        tokens_out + live[6],
        items + live[7],
    )


def shape_stats(balancer: Balancer, rows, cooling, events, timings, now: float) -> list[dict]:
    """The statistics of each member as ``stats`` gives them, from what a backend read:
    ``rows`` {member: (requests, successes, failures, last used, last error, tokens in, tokens
    out, items)}, ``cooling`` {member: (until, reason, known)}, ``events`` {member: (requests, token
    reports)} of the last day, ``timings`` {member: [(first chunk, total)]}, newest first."""
    total = sum(r[0] for r in rows.values())
    result = []
    for index, member in enumerate(balancer.members):
        requests, successes, failures, last_used, last_error, tokens_in, tokens_out, items = (
            rows.get(index, (0, 0, 0, None, None, 0, 0, 0))
        )
        until, reason, _ = cooling.get(index, (None, None, None))
        if until is not None and not math.isfinite(until):
            until = now + MAX_SECONDS
        recent = timings.get(index, [])
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
