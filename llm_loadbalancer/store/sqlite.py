"""This machine's state: one SQLite file, ``loadbalancers.db`` in the llm folder a balancer was
read from, in WAL mode with a busy timeout. Each choice is one write transaction (``BEGIN
IMMEDIATE``), and so is each outcome, so concurrent ``llm`` processes take turns exactly.
Every failure of the file is ``StateUnavailable``: the prompt is answered without it.

Its schema is ``migrations.py``'s. What it stores, per balancer name:
- ``rotation``: the definition's signature and the rotation position; a new definition starts
  everything again.
- ``requests``: the requests counted in advance (limits, least-busy), numbered per member
  (``seq``): a window's count is two index look-ups (the newest number, and the number before
  the window), not a scan. Under least-busy, in flight until ``total`` is set.
- ``outcomes``: how each attempt ended, numbered per member (``n``) with the running total of
  its tokens (``cum``), for the same reason. Rows older than a day are folded into ``stats``,
  one record in PRUNE_EVERY, for the member recorded.
- ``cooldowns`` (``known``: the provider stated it), ``affinity``: conversation ties.
"""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import stat
import threading
import time

from .. import limits
from ..config import Balancer
from ..selection import choose, counted_ahead, free_at
from . import Choice, Outcome, StateUnavailable, rules, timeout
from .migrations import TooNew, upgrade

FILENAME = "loadbalancers.db"
PRUNE_EVERY = 100


class SQLiteStore:
    "The state kept in one SQLite file (``store.Store``)."

    pause = staticmethod(time.sleep)  # between tries to put a new file in WAL mode (tests: no)

    def __init__(self, path: str):
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.lock = threading.Lock()  # one transaction at a time on the shared connection

    # --- the file -----------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        if self.db is None:
            _private_regular_file(self.path)
            db = sqlite3.connect(
                self.path, timeout=timeout(), isolation_level=None, check_same_thread=False
            )
            try:
                # A new file gets small pages: a prompt rewrites a few pages, and every byte of
                # them goes to the disk at the next checkpoint (a file keeps its page size).
                db.execute("pragma page_size=1024")
                self._wal(db)
                db.execute("pragma synchronous=normal")
                upgrade(db)
            except BaseException:
                db.close()
                raise
            self.db = db
        return self.db

    def _wal(self, db) -> None:
        """Put the file in WAL mode. A new file needs a moment to itself for that: while another
        process is creating it too, SQLite refuses at once instead of waiting (its busy timeout
        does not apply), so this tries again until the timeout."""
        deadline = time.monotonic() + timeout()
        while True:
            try:
                db.execute("pragma journal_mode=wal")
                return
            except sqlite3.OperationalError as ex:
                if "locked" not in str(ex) or time.monotonic() >= deadline:
                    raise
                self.pause(0.005)

    def transaction(self, write: bool = True) -> _Transaction:
        "``with store.transaction() as db``: the file, inside one transaction."
        return _Transaction(self, write)

    def unavailable(self, ex: BaseException) -> None:
        "A failure of the file, raised as StateUnavailable; anything else is left as it is."
        if isinstance(ex, (StateUnavailable, TooNew)):
            raise StateUnavailable(f"{self.path}: {ex}") from ex
        if isinstance(ex, (sqlite3.Error, OSError)):
            if self.db is not None:
                self.db.close()
            self.db = None
            hint = ""
            if "not a database" in str(ex) or "malformed" in str(ex):
                hint = (
                    ": the file is damaged; move it away (rotation, cooldowns and statistics "
                    "start afresh)"
                )
            raise StateUnavailable(f"{self.path}: {ex}{hint}") from ex

    # --- choosing -----------------------------------------------------------------------------

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
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            position, cooldowns = _rotation_and_cooldowns(db, balancer)
            snapshot = _FileSnapshot(db, balancer, now, cooldowns)
            snapshot.position = position
            if conversation and (tool_turn or balancer.sticky):
                snapshot.tie = db.execute(
                    "select first_member, last_member from affinity "
                    "where balancer = ? and conversation = ?",
                    [balancer.name, conversation],
                ).fetchone()
            if balancer.policy == "least-busy":
                snapshot.busy = _in_flight(db, balancer, now)
            elif balancer.policy == "lowest-latency":
                snapshot.latency = _latencies(db, balancer, now, stream)
            plan = choose(
                balancer, snapshot, tool_turn=tool_turn, unavailable=unavailable, rng=rng, now=now
            )
            if plan.position != position:
                db.execute(
                    "update rotation set position = ? where balancer = ?",
                    [plan.position, balancer.name],
                )
            ticket = None
            if plan.order and counted_ahead(balancer, plan.order[0]):
                first = plan.order[0]
                ticket = _sent(db, balancer, first, now, snapshot.last_requests.get(first))
            return Choice(plan, ticket, snapshot.cooled, now)

    def claim(self, balancer: Balancer, member: int, now: float | None = None):
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            cooldowns = db.execute(
                "select member, until, known from cooldowns where balancer = ? and member = ?",
                [balancer.name, member],
            ).fetchall()
            snapshot = _FileSnapshot(db, balancer, now, cooldowns)
            if member in snapshot.blocked or free_at(balancer, snapshot, member, now) is not None:
                return None
            return _sent(db, balancer, member, now, snapshot.last_requests.get(member))

    # --- recording ----------------------------------------------------------------------------

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        if balancer.policy != "least-busy":  # (only least-busy counts requests in flight)
            return
        with self.transaction() as db:
            _ended(db, balancer.name, member, ticket, time.time() if now is None else now)

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        name = balancer.name
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            if ticket is not None and balancer.policy == "least-busy":
                _ended(db, name, member, ticket, now)
            # numbered after the member's last outcome, its tokens added to their running total
            last_at, number, cum = db.execute(
                "select at, n, cum from outcomes where balancer = ? and member = ? "
                "order by at desc, n desc limit 1",
                [name, member],
            ).fetchone() or (None, 0, 0)
            _after_now(db, "outcomes", name, member, last_at, now)
            spent = outcome.tokens_in + outcome.tokens_out
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
                    outcome.first_chunk,
                    outcome.total,
                    int(outcome.streamed),
                    outcome.tokens_in,
                    outcome.tokens_out,
                    outcome.error,
                    outcome.items,
                ],
            )
            prune = random.random() * PRUNE_EVERY < 1
            if prune:  # this member's rows older than a day: into the totals
                _fold(db, name, member, now - limits.LONGEST)
            if outcome.cooldown:
                previous = db.execute(
                    "select length from cooldowns where balancer = ? and member = ?",
                    [name, member],
                ).fetchone()
                length = rules.next_cooldown(outcome.cooldown, previous and previous[0])
                db.execute(
                    "insert into cooldowns (balancer, member, until, reason, known, length) "
                    "values (?, ?, ?, ?, ?, ?) on conflict do update set until = excluded.until, "
                    "reason = excluded.reason, known = excluded.known, length = excluded.length",
                    [name, member, now + length, outcome.error, int(outcome.stated), length],
                )
            elif outcome.error is None and outcome.cooled:
                db.execute(
                    "delete from cooldowns where balancer = ? and member = ?", [name, member]
                )
            if prune:  # ties unused for KEEP_DAYS are forgotten (indexed)
                db.execute(
                    "delete from affinity where updated < ?", [now - rules.KEEP_DAYS * rules.DAY]
                )
            if outcome.error is None and outcome.conversation:
                db.execute(  # the first member is kept
                    "insert into affinity (balancer, conversation, first_member, last_member, "
                    "updated) values (?, ?, ?, ?, ?) on conflict do update set "
                    "last_member = excluded.last_member, updated = excluded.updated",
                    [name, outcome.conversation, member, member, now],
                )

    def reset(self, balancer: Balancer) -> None:
        self.forget(balancer.name)

    def forget(self, name: str) -> None:
        "Everything kept under the name, whatever the definition."
        with self.transaction() as db:
            _clear(db, name)

    # --- looking ------------------------------------------------------------------------------

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        name = balancer.name
        rows, cooling, events, timings = {}, {}, {}, {}
        with self.transaction(write=False) as db:
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
                    live = db.execute(f"select {OUTCOMES}", [name, index, float("inf")]).fetchone()
                    if live[0]:
                        rows[index] = _added(rows.get(index), live)
                cooling = {
                    r[0]: r[1:]
                    for r in db.execute(
                        "select member, until, reason from cooldowns "
                        "where balancer = ? and until > ?",
                        [name, now],
                    )
                }
                for index, member in enumerate(balancer.members):
                    if member.limits:
                        events[index] = _events(db, name, index, now - limits.LONGEST)
                    timings[index] = db.execute(
                        "select first_chunk, total from outcomes where balancer = ? "
                        "and member = ? and total > 0 order by at desc limit ?",
                        [name, index, rules.RECENT],
                    ).fetchall()
        return rules.shape_stats(balancer, rows, cooling, events, timings, now)

    def report(self, balancer: Balancer) -> dict:
        return {"file": self.path}


def _private_regular_file(path: str) -> None:
    """Make sure the state file is a regular file of its own, private to its user: created 0600
    (SQLite gives its -wal and -shm files the mode of the file), an older file's mode narrowed
    to that, and never followed through a link (SQLite would create its journal beside the
    link's target) or opened when it is a device, a FIFO or a folder."""
    if os.path.islink(path):
        raise StateUnavailable(
            "it is a link, which the state is never written through: move it away (rotation, "
            "cooldowns and statistics start afresh)"
        )
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    descriptor = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o600)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise StateUnavailable("it is not a regular file: move it away")
        if os.name == "posix" and info.st_mode & 0o077:  # made by an earlier version: 0644
            os.fchmod(descriptor, 0o600)
            for suffix in ("-wal", "-shm"):
                try:
                    os.chmod(path + suffix, 0o600)
                except FileNotFoundError:
                    pass
    finally:
        os.close(descriptor)


class _Transaction:
    """The file inside one transaction, under the store's lock; every failure of the file
    becomes StateUnavailable. (A class rather than a generator: a prompt enters two.)"""

    def __init__(self, store: SQLiteStore, write: bool):
        self.store = store
        self.write = write

    def __enter__(self) -> sqlite3.Connection:
        store = self.store
        store.lock.acquire()
        try:
            self.db = store.connect()
            self.db.execute("begin immediate" if self.write else "begin")
        except BaseException as ex:
            try:
                store.unavailable(ex)  # (under the lock: it closes the shared connection)
            finally:
                store.lock.release()
            raise
        return self.db

    def __exit__(self, kind, ex, traceback) -> None:
        try:
            self.db.execute("commit" if kind is None else "rollback")
        except BaseException as problem:
            self.store.unavailable(problem)
            raise
        else:
            if ex is not None:
                self.store.unavailable(ex)
        finally:
            self.store.lock.release()


def _rotation_and_cooldowns(db, balancer: Balancer) -> tuple[int, list]:
    """The stored rotation position and the cooldowns on record (member, until, stated), read
    at once; a changed member list starts everything again (no cooldowns)."""
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


class _FileSnapshot:
    "What the file knows of a balancer (``selection.Snapshot``), read in one transaction."

    def __init__(self, db, balancer: Balancer, now: float, cooldowns):
        self.db, self.balancer, self.now = db, balancer, now
        self.cooling, self.blocked, self.cooled = rules.read_cooldowns(cooldowns, now)
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


@functools.lru_cache(maxsize=32)
def _window_query(names: tuple[str, ...]) -> tuple[list[float], str]:
    """The windows of these limits, and one statement giving, for requests (and tokens, with a
    token limit), the newest row's time and running number and, per window, the running number
    just before the oldest row inside it. Parameters: balancer, member, each window's start.
    (Cached: built once per set of limits, not per prompt.)"""
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
    row's (at, seq): the ticket. Under least-busy it is in flight (no total yet) until it ends;
    otherwise its total is 0, which keeps it out of the in-flight index."""
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


def _in_flight(db, balancer: Balancer, now: float) -> dict[int, int]:
    "Prompts in flight per member, across this machine's processes (``rules.in_flight``)."
    rows = db.execute(
        "select member, at, pid from requests where balancer = ? and total is null and at > ?",
        [balancer.name, now - rules.IN_FLIGHT_HOURS * 3600],
    )
    return rules.in_flight(rows, now, rules.alive)


def _latencies(db, balancer: Balancer, now: float, stream: bool) -> dict[int, float]:
    """Each member's recent latency (``rules.median_latency``); members without one left out.
    (Only the timings of the prompt's kind are fetched, as many as the rule reads.)"""
    column = "first_chunk" if stream else "total"
    found = {}
    for member in range(len(balancer.members)):
        timings = db.execute(
            "select at, first_chunk, total, streamed from outcomes where balancer = ? "
            f"and member = ? and streamed = ? and {column} > 0 and at > ? "
            "order by at desc limit ?",
            [
                balancer.name,
                member,
                int(stream),
                now - rules.RECENT_HOURS * 3600,
                rules.RECENT_TIMINGS,
            ],
        )
        median = rules.median_latency(timings, now, stream)
        if median is not None:
            found[member] = median
    return found


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
