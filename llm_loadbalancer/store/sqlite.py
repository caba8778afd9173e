"""This machine's state: one SQLite file, ``loadbalancers.db`` in the llm folder a balancer was
read from, in WAL mode with a busy timeout. Each choice is one write transaction (``BEGIN
IMMEDIATE``), and so is each outcome, so concurrent ``llm`` processes take turns exactly.
Every failure of the file is ``StateUnavailable``: prompts are then answered from this
process's memory (``fallback.py``).

Its schema is ``migrations.py``'s. What it stores, per definition of a balancer (its name and
a digest of its member list, ``_key``: a process still holding an older definition keeps its
own rows and never resets the new one's):
- ``rotation``: the rotation position.
- ``requests``: the prompts in flight under least-busy, each counting while its ``lease``
  lasts (``leases.py`` renews it), until ``total`` is set.
- ``outcomes``: how each attempt ended. Rows older than a day are folded into ``stats``, one
  record in PRUNE_EVERY, for the member recorded.
- ``cooldowns`` (``known``: the provider stated it), ``affinity``: conversation ties.
And per provider's bucket (``rules.bucket``: a model and a stored key), shared by every
balancer: ``bucket_requests`` and ``bucket_tokens``, the requests and tokens counted against
limits, numbered (``seq``, ``n``) with running totals, so that a window's count is two index
look-ups, not a scan (a report keeps the estimate it replaced, ``rules.history``);
``bucket_reserved``, the tokens reserved by prompts in flight under a token limit, until their
member reports (``estimates.py``); ``bucket_limits``, the limits each member declared for its
bucket, of which the strictest applies (``rules.strictest``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import sqlite3
import stat
import threading
import time
from typing import NamedTuple

from .. import limits
from ..config import Balancer
from ..estimates import History
from .. import affinity
from ..selection import by_affinity, choose, counted_ahead, free_at, limited, need_of
from . import Choice, Outcome, Route, StateUnavailable, rules, timeout
from ..speed import kept
from .migrations import TooNew, upgrade

FILENAME = "loadbalancers.db"
PRUNE_EVERY = 100
WAL_BYTES = 16 * 1024 * 1024  # written to the WAL between checkpoints (its most on disk)


class SQLiteStore:
    "The state kept in one SQLite file (``store.Store``)."

    pause = staticmethod(time.sleep)  # between tries to put a new file in WAL mode (tests: no)

    def __init__(self, path: str, wait: float | None = None):
        self.path = self.name = path  # (":memory:": a process's own, when a file cannot be used)
        self.wait = wait  # seconds to wait for the file's lock (None: ``timeout()``)
        self.db: sqlite3.Connection | None = None
        self.lock = threading.Lock()  # one transaction at a time on the shared connection
        # {bucket: (when, requests before the minute, before the day, tokens before the
        # minute, before the day)}: the running numbers at the start of each window, as this
        # connection last read them (``_FileSnapshot._read``)
        self.starts: dict[str, tuple] = {}

    # --- the file -----------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        if self.db is None:
            if self.path != ":memory:":
                _private_regular_file(self.path)
            wait = timeout() if self.wait is None else self.wait
            db = sqlite3.connect(
                self.path, timeout=wait, isolation_level=None, check_same_thread=False
            )
            try:
                # A new file gets small pages: a prompt rewrites a few pages, and every byte of
                # them goes to the disk at the next checkpoint (a file keeps its page size).
                db.execute("pragma page_size=1024")
                self._wal(db)
                db.execute("pragma synchronous=normal")
                # A checkpoint (two fsyncs, milliseconds, which a prompt waits for) every
                # WAL_BYTES written, not every 1000 pages, SQLite's default (1 MB with our
                # pages): on a virtual disk, 24 us a prompt with limits at 1 MB, 4 at 16 MB
                page = db.execute("pragma page_size").fetchone()[0]
                db.execute(f"pragma wal_autocheckpoint={WAL_BYTES // page}")
                upgrade(db)
            except BaseException:
                db.close()
                raise
            self.db = db
            self.starts = {}
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

    def close(self) -> None:
        "The connection closed (between transactions): the next one opens the file again."
        with self.lock:
            if self.db is not None:
                self.db.close()
                self.db = None

    def transaction(self, write: bool = True) -> _Transaction:
        "``with store.transaction() as db``: the file, inside one transaction."
        return _Transaction(self, write)

    def unavailable(self, ex: BaseException) -> None:
        "A failure of the file, raised as StateUnavailable; anything else is left as it is."
        if isinstance(ex, (StateUnavailable, TooNew)):
            raise StateUnavailable(f"{self.path}: {ex}") from ex
        if isinstance(ex, (ValueError, TypeError)):  # a value in the file this code cannot read
            raise StateUnavailable(
                f"{self.path}: it holds a value this version cannot read "
                f"({type(ex).__name__}: {ex}): move it away (rotation, cooldowns and "
                "statistics start afresh)"
            ) from ex
        if isinstance(ex, (sqlite3.Error, OSError)):
            if self.db is not None:
                self.db.close()
            self.db = None
            raise StateUnavailable(f"{self.path}: {_problem(self.path, ex)}") from ex

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
        demand=None,
        prefix: str | None = None,
        dry: bool = False,
    ) -> Choice:
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            key = _key(balancer)
            tied = conversation if tool_turn or balancer.sticky or balancer.affinity else None
            home = affinity.TAG + prefix if prefix and balancer.affinity else None
            position, cooldowns, ties = _rotation_and_cooldowns(db, balancer, key, tied, home)
            snapshot = _FileSnapshot(db, balancer, key, now, cooldowns, self.starts)
            snapshot.position = position
            if tied and tied in ties:
                snapshot.tie = ties[tied][:2]
            if home and home in ties:
                snapshot.home = ties[home][1:]
            if balancer.policy == "least-busy":
                snapshot.busy = _in_flight(db, key, now)
            elif balancer.policy == "lowest-latency":
                snapshot.latency = _latencies(db, balancer, key, now, stream)
            plan = choose(
                balancer,
                snapshot,
                tool_turn=tool_turn,
                unavailable=unavailable,
                rng=rng,
                now=now,
                demand=demand,
                prefix=prefix,
            )
            if plan.order and plan.order[0] in snapshot.due:
                plan = plan._replace(why=f"{plan.why}, its probe after a cooldown")
            if dry:  # (``route``: what was read, and nothing stored: the transaction rolls back)
                free = limited(balancer, snapshot, now, demand)
                raise _Dry(Route(plan, free, snapshot.cooling, snapshot.blocked, now))
            if by_affinity(plan):
                db.execute("update rotation set routed = routed + 1 where balancer = ?", [key])
            if plan.position != position:
                db.execute(
                    "update rotation set position = ? where balancer = ?", [plan.position, key]
                )
            _redate(db, key, snapshot.redated)
            ticket = snapshot.count(plan.order[0], demand) if plan.order else None
            return Choice(plan, ticket, snapshot.cooled, now, snapshot.home)

    def route(
        self, balancer: Balancer, *, unavailable=frozenset(), now=None, demand=None, prefix=None
    ) -> Route:
        try:
            self.choose(
                balancer,
                unavailable=unavailable,
                now=now,
                demand=demand,
                prefix=prefix,
                dry=True,
            )
        except _Dry as dry:
            return dry.route
        raise AssertionError("a dry choice always ends in _Dry")

    def claim(self, balancer: Balancer, member: int, now: float | None = None, demand=None):
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            key = _key(balancer)
            cooldowns = db.execute(
                "select member, until, known, length from cooldowns "
                "where balancer = ? and member = ?",
                [key, member],
            ).fetchall()
            snapshot = _FileSnapshot(db, balancer, key, now, cooldowns, self.starts)
            _redate(db, key, snapshot.redated)
            if (
                member in snapshot.blocked
                or free_at(balancer, snapshot, member, now, demand) is not None
            ):
                return False
            return snapshot.count(member, demand)

    # --- recording ----------------------------------------------------------------------------

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        if not ticket.leased:  # (least-busy counts requests in flight; token limits, tokens)
            return
        with self.transaction() as db:
            now = time.time() if now is None else now
            if ticket.at is not None:
                _ended(db, _key(balancer), member, ticket, now)
            _unreserve(db, balancer.members[member], ticket)
            if ticket.probe:  # ended without an outcome: the next prompt probes again
                _probe_ended(db, _key(balancer), member, now)

    def renew(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        "A prompt in flight still runs: its lease lasts ``rules.LEASE`` from now."
        with self.transaction() as db:
            now = time.time() if now is None else now
            if ticket.at is not None:
                db.execute(
                    "update requests set lease = ? where balancer = ? and member = ? "
                    "and at = ? and seq = ? and total is null",
                    [now + rules.LEASE, _key(balancer), member, ticket.at, ticket.id],
                )
            if ticket.reserved is not None:
                db.execute(
                    "update bucket_reserved set lease = ? where bucket = ? and id = ?",
                    [now + rules.LEASE, rules.bucket(balancer.members[member]), ticket.id],
                )
            if ticket.probe:
                db.execute(
                    "update cooldowns set until = ? where balancer = ? and member = ? "
                    "and known = ?",
                    [now + rules.LEASE, _key(balancer), member, rules.PROBING],
                )

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        key = _key(balancer)
        with self.transaction() as db:
            now = time.time() if now is None else now  # in the lock: rows in time order
            if ticket is not None and ticket.at is not None:
                _ended(db, key, member, ticket, now)
            db.execute(
                "insert into outcomes (balancer, member, at, n, first_chunk, total, streamed, "
                "input_tokens, output_tokens, error, items) "
                "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    key,
                    member,
                    now,
                    random.getrandbits(62),  # (names the row: outcomes have no running total)
                    outcome.first_chunk,
                    outcome.total,
                    int(outcome.streamed),
                    outcome.tokens_in,
                    outcome.tokens_out,
                    outcome.error,
                    outcome.items,
                ],
            )
            own = balancer.members[member]
            bucket = rules.bucket(own)
            if ticket is not None:
                _unreserve(db, own, ticket)
            spent, estimate, output = rules.spent(outcome, ticket)
            if spent > 0 and rules.counts_tokens(own.limits, ticket):
                db.execute(_SPENT, [bucket, now, spent, estimate, output])
            prune = random.random() * PRUNE_EVERY < 1
            if prune:  # this member's rows older than a day: into the totals
                _fold(db, key, member, bucket, now - limits.LONGEST)
            if outcome.cooldown:
                previous = db.execute(
                    "select length from cooldowns where balancer = ? and member = ?",
                    [key, member],
                ).fetchone()
                length = rules.next_cooldown(
                    outcome.cooldown, previous and previous[0], outcome.exact
                )
                db.execute(
                    "insert into cooldowns (balancer, member, until, reason, known, length) "
                    "values (?, ?, ?, ?, ?, ?) on conflict do update set until = excluded.until, "
                    "reason = excluded.reason, known = excluded.known, length = excluded.length",
                    [key, member, now + length, outcome.error, int(outcome.stated), length],
                )
            elif outcome.error is None and (outcome.cooled or getattr(ticket, "probe", False)):
                db.execute("delete from cooldowns where balancer = ? and member = ?", [key, member])
            elif getattr(ticket, "probe", False):  # an error that calls for no cooldown
                _probe_ended(db, key, member, now)
            if prune:  # ties unused for KEEP_DAYS are forgotten (indexed), a prefix's for affinity
                db.execute(
                    "delete from affinity where updated < ?", [now - rules.KEEP_DAYS * rules.DAY]
                )
                db.execute(
                    "delete from affinity where balancer = ?1 and conversation >= ?2 "
                    "and conversation < ?3 and updated < ?4",
                    [key, affinity.TAG, affinity.TAG[:-1] + ";", now - balancer.affinity],
                )
            for tied in (outcome.conversation, outcome.prefix and affinity.TAG + outcome.prefix):
                if outcome.error is None and tied:
                    db.execute(  # the first member is kept; a prefix's is its last
                        "insert into affinity (balancer, conversation, first_member, "
                        "last_member, updated) values (?, ?, ?, ?, ?) on conflict do update set "
                        "last_member = excluded.last_member, updated = excluded.updated",
                        [key, tied, member, member, now],
                    )

    def reset(self, balancer: Balancer) -> None:
        with self.transaction() as db:
            _clear(db, balancer.name)

    def forget(self, name: str) -> None:
        """Everything kept under the name, whatever the definition, and the limits it declared;
        not the windows of the providers' buckets: the requests a key received still count
        against its limits."""
        with self.transaction() as db:
            _clear(db, name)
            db.execute(
                "delete from bucket_limits where source > ?1 || ':' and source < ?1 || ';'",
                [name],
            )

    def retire(self, balancer: Balancer) -> None:
        "What one definition kept (it was replaced): as ``forget``, for it alone."
        with self.transaction() as db:
            key = _key(balancer)
            for table in TABLES:
                db.execute(f"delete from {table} where balancer = ?", [key])
            db.execute(
                "delete from bucket_limits where source > ? and source < ?",
                [key + "#", key + "$"],
            )

    def declare(self, balancer: Balancer, now: float | None = None) -> None:
        "The limits of each member of a definition, declared for its bucket."
        with self.transaction() as db:
            now = time.time() if now is None else now
            key = _key(balancer)
            for index, member in enumerate(balancer.members):
                if member.limits:
                    _declare(db, f"{key}#{index}", member, now)

    # --- looking ------------------------------------------------------------------------------

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        key = _key(balancer)
        events = {}
        with self.transaction(write=False) as db:
            rows = {
                r[0]: r[1:]
                for r in db.execute(
                    "select member, requests, successes, failures, last_used, last_error, "
                    "input_tokens, output_tokens, items from stats where balancer = ?",
                    [key],
                )
            }
            for index in range(len(balancer.members)):  # and the rows not yet in the totals
                live = db.execute(f"select {OUTCOMES}", [key, index, float("inf")]).fetchone()
                if live[0]:
                    rows[index] = _added(rows.get(index), live)
            cooling = rules.cooling_now(
                db.execute(
                    "select member, until, known, length, reason from cooldowns "
                    "where balancer = ?",
                    [key],
                ).fetchall(),
                now,
            )
            timings, applied, reservations = {}, {}, {}
            for index, member in enumerate(balancer.members):
                bucket = rules.bucket(member)
                declared = db.execute(f"select {_DECLARED}", [bucket]).fetchone()[0]
                applied[index] = rules.strictest(member.limits, _declarations(declared), now)
                if applied[index]:
                    events[index] = _events(db, bucket, now - limits.LONGEST)
                    reserved = db.execute(f"select {_RESERVED}", [bucket]).fetchone()[0]
                    reservations[index] = rules.reserved(_reservations(reserved), now)
                timings[index] = db.execute(
                    "select first_chunk, total from outcomes where balancer = ? "
                    "and member = ? and total > 0 order by at desc limit ?",
                    [key, index, rules.RECENT],
                ).fetchall()
        return rules.shape_stats(
            balancer, rows, cooling, events, timings, now, applied, reservations
        )

    def affinity(self, balancer: Balancer, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        key = _key(balancer)
        with self.transaction(write=False) as db:
            row = db.execute("select routed from rotation where balancer = ?", [key]).fetchone()
            held = db.execute(
                "select count(*) from affinity where balancer = ?1 and conversation >= ?2 "
                "and conversation < ?3 and updated >= ?4",
                [key, affinity.TAG, affinity.TAG[:-1] + ";", now - balancer.affinity],
            ).fetchone()[0]
        return {"routed": row[0] if row else 0, "prefixes": held}

    def report(self, balancer: Balancer) -> dict:
        return {"file": self.path}


def _problem(path: str, ex: BaseException) -> str:
    "What went wrong with the file, in the user's words."
    text = str(ex)
    if "not a database" in text or "malformed" in text:
        return (
            f"{text}: the file is damaged; move it away (rotation, cooldowns and statistics "
            "start afresh)"
        )
    if "locked" in text:
        return "it is busy: another process holds its lock; try again"
    if "full" in text or "disk I/O" in text or getattr(ex, "errno", None) == errno.ENOSPC:
        try:
            free = shutil.disk_usage(os.path.dirname(path) or ".").free
        except OSError:
            free = None
        if "full" in text or (free is not None and free < 1024 * 1024):
            return "the disk is full: free some space"
    return text


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


# The tables kept per definition (``name:definition``); the buckets' are shared.
TABLES = ("rotation", "cooldowns", "stats", "affinity", "requests", "outcomes")


def _key(balancer: Balancer) -> str:
    """How the tables name a balancer's definition: ``name:`` and a digest of its member list.
    A new member list starts its own rotation and statistics; a process still holding the old
    one keeps its own rows, without touching the new one's. (Kept per member list and name.)"""
    names = _KEYS.get(balancer.signature)
    if names is None:
        names = _KEYS[balancer.signature] = {}
    found = names.get(balancer.name)
    if found is None:
        digest = hashlib.sha256(balancer.signature.encode()).hexdigest()[:8]
        found = names[balancer.name] = f"{balancer.name}:{digest}"
    return found


_KEYS: dict[str, dict[str, str]] = {}


def _rotation_and_cooldowns(
    db, balancer: Balancer, key: str, *tied: str | None
) -> tuple[int, list, dict]:
    """The stored rotation position, the cooldowns on record (member, until, stated, length),
    and {conversation: (first member, last member, updated)} of the ties asked for (a
    conversation's, a prefix's: ``tied``, None for none), read in one statement; a definition
    met for the first time starts at 0 (or takes over what version 5 of the file kept under its
    name, when that was this definition)."""
    tied = tuple(name for name in tied if name)
    rotation, cooldowns, ties = None, [], {}
    for row in db.execute(_ROTATION_AND_COOLDOWNS[len(tied)], [key, *tied]).fetchall():
        if row[0] == -1:
            rotation = row[1]
        elif row[0] == -2:
            ties[row[4]] = row[1:4]
        else:
            cooldowns.append(row[:4])
    if rotation is not None:
        return rotation, cooldowns, ties
    if _take_over(db, balancer, key):
        return _rotation_and_cooldowns(db, balancer, key, *tied)
    db.execute(
        "insert into rotation (balancer, signature, position) values (?, ?, 0)",
        [key, balancer.signature],
    )
    return 0, cooldowns, ties


# _rotation_and_cooldowns's statement, reading 0, 1 or 2 ties (?2, ?3) besides
_ROTATION_AND_COOLDOWNS = [
    "select -1, position, 0, 0, null from rotation where balancer = ?1 "
    "union all select member, until, known, length, null from cooldowns where balancer = ?1"
    + "".join(
        " union all select -2, first_member, last_member, updated, conversation from affinity "
        f"where balancer = ?1 and conversation = ?{2 + n}"
        for n in range(ties)
    )
    for ties in range(3)
]


def _take_over(db, balancer: Balancer, key: str) -> bool:
    """What a version-5 file kept under the balancer's bare name, when it is of this
    definition: its rows become the definition's, and the requests and tokens its limited
    members counted are copied into their buckets' windows."""
    name = balancer.name
    row = db.execute("select signature from rotation where balancer = ?", [name]).fetchone()
    if row is None or row[0] != balancer.signature:
        return False
    for table in TABLES:
        db.execute(f"update or ignore {table} set balancer = ? where balancer = ?", [key, name])
    buckets = {}
    for index, member in enumerate(balancer.members):
        if member.limits:
            buckets.setdefault(rules.bucket(member), []).append(index)
    for bucket, members in buckets.items():
        # the members' requests and token reports, with what the bucket has already, numbered
        # again in time order: members sharing a bucket each had numbers of their own
        places = ", ".join("?" * len(members))
        requests = db.execute(
            "select at from bucket_requests where bucket = ? union all select at from "
            f"requests where balancer = ? and member in ({places})",
            [bucket, key, *members],
        ).fetchall()
        tokens = db.execute(
            "select at, tokens from bucket_tokens where bucket = ? union all select at, tokens "
            f"from outcomes where balancer = ? and member in ({places}) and tokens > 0",
            [bucket, key, *members],
        ).fetchall()
        # (numbered on from the bucket's newest numbers: a running number never goes down, which
        # the bounds of windows that processes keep rely on, ``_FileSnapshot._read``)
        seq, n, cum = db.execute(
            "select (select max(seq) from bucket_requests where bucket = ?1), "
            "(select max(n) from bucket_tokens where bucket = ?1), "
            "(select max(cum) from bucket_tokens where bucket = ?1)",
            [bucket],
        ).fetchone()
        for table in ("bucket_requests", "bucket_tokens"):
            db.execute(f"delete from {table} where bucket = ?", [bucket])
        db.executemany(
            "insert into bucket_requests (bucket, at, seq) values (?, ?, ?)",
            [(bucket, at, seq) for seq, (at,) in enumerate(sorted(requests), (seq or 0) + 1)],
        )
        cum = cum or 0
        for n, (at, spent) in enumerate(sorted(tokens), (n or 0) + 1):
            cum += spent
            db.execute(
                "insert into bucket_tokens (bucket, at, n, tokens, cum) values (?, ?, ?, ?, ?)",
                [bucket, at, n, spent, cum],
            )
        db.execute(
            f"delete from requests where balancer = ? and member in ({places}) "
            "and total is not null",
            [key, *members],
        )
    return True


def _clear(db, name: str) -> None:
    """Every definition's rows of a name (and a version-5 file's, under the bare name), but its
    declared limits: they still apply while the balancer is saved."""
    for table in TABLES:
        db.execute(
            f"delete from {table} where balancer = ?1 or (balancer > ?1 || ':' "
            "and balancer < ?1 || ';')",
            [name],
        )


def _declare(db, source: str, member, now: float) -> None:
    "A member's own limits, declared for its bucket by ``source`` (a definition's member)."
    numbers = rules.declaration(member.limits)
    line = "|".join(["" if n is None else str(n) for n in numbers] + [repr(now), source])
    db.execute(
        "insert or replace into bucket_limits (bucket, source, rpm, rpd, tpm, tpd, at, line) "
        "values (?, ?, ?, ?, ?, ?, ?, ?)",
        [rules.bucket(member), source, *numbers, now, line],
    )


def _redate(db, key: str, redated: dict) -> None:
    "Cooldowns that end later than they can (a clock step): their corrected end."
    for member, until in redated.items():
        db.execute(
            "update cooldowns set until = ? where balancer = ? and member = ?", [until, key, member]
        )


class _Dry(Exception):
    "A choice that stores nothing: what it found, raised out of its transaction (rolled back)."

    def __init__(self, route: Route):
        super().__init__("dry choice")
        self.route = route


class Ticket(NamedTuple):
    """A request counted when it was chosen: whether the tokens it reports count against its
    bucket's limits; in flight (least-busy), its row's time (``at``); the number naming its
    rows (``id``); the tokens it reserved in its bucket (None: no reservation) and its input's
    estimate."""

    tokens: bool
    at: float | None = None
    id: int | None = None
    reserved: int | None = None
    estimate: int | None = None
    probe: bool = False  # the member's probe after its cooldown (``rules.PROBING``)

    @property
    def leased(self) -> bool:
        "Whether it holds something while it runs (in flight, a reservation, a probe): a lease."
        return self.at is not None or self.reserved is not None or self.probe


class _FileSnapshot:
    "What the file knows of a balancer (``selection.Snapshot``), read in one transaction."

    def __init__(self, db, balancer: Balancer, key: str, now: float, cooldowns, starts: dict):
        self.db, self.balancer, self.key, self.now = db, balancer, key, now
        self.starts = starts  # (SQLiteStore.starts: kept from choice to choice)
        self._bounds: set[int] = set()  # members whose totals are bounds, not exact
        self.cooling, self.blocked, self.cooled, self.redated = rules.read_cooldowns(
            cooldowns, now
        )
        self.due = rules.due(self.cooling, self.blocked, self.cooled)
        self.tie = self.busy = self.latency = self.home = None
        self.needs: dict = {}
        self.position = 0
        self.last_requests: dict[int, tuple] = {}  # (time, number) of each bucket's last request
        # per member: the limits that apply, its bucket's totals, the limits declared for it
        self._limits: dict[int, dict] = {}
        self._totals: dict[int, dict] = {}
        self._declared: dict[int, list] = {}
        # per member: its bucket's reservations and what its last reports say, as read
        self._reserved: dict[int, str | None] = {}
        self._reports: dict[int, str | None] = {}

    def limits(self, member: int) -> dict:
        found = self._limits.get(member)
        if found is None:
            own = self.balancer.members[member]
            bucket = rules.bucket(own)
            if own.limits:  # its bucket's windows will be needed: read with the declarations
                declared = self._read(member, bucket)
            else:
                declared = _declarations(
                    self.db.execute(f"select {_DECLARED}", [bucket]).fetchone()[0]
                )
            self._declared[member] = declared
            found = self._limits[member] = _strictest(own.limits, declared, self.now)
        return found

    def _read(self, member: int, bucket: str, exact: bool = False) -> list:
        """Read the bucket's windows (requests and tokens, in the last minute and day) and the
        limits declared for it, in one statement; the declarations.

        A window's count is its newest running number less the one just before the window.
        That one only grows as time passes, so the one this connection read at an earlier
        time (``starts``) gives a count at least the window's: a bound, which spares the
        statement four look-ups, and which ``totals(member, exact=True)`` replaces with the
        count itself when the bound leaves no room. (Not once the clock went back.)"""
        now = self.now
        arguments = [bucket, now - 60, now - rules.DAY, now, rules.RECENT_REPORTS]
        start = None if exact else self.starts.get(bucket)
        if start is not None and start[0] <= now:
            seq, cum, declared, reserved, reports = self.db.execute(_NEWEST, arguments).fetchone()
            seq, cum = seq or 0, cum or 0
            if seq >= start[1] and cum >= start[3]:  # (no count below 0: none dated after now)
                self._reserved[member], self._reports[member] = reserved, reports
                self.last_requests[member] = seq
                self._totals[member] = {
                    60.0: (seq - start[1], cum - start[3]),
                    rules.DAY: (seq - start[2], cum - start[4]),
                }
                self._bounds.add(member)
                return _declarations(declared)
        row = self.db.execute(_BUCKET, arguments).fetchone()
        seq, cum = row[0], row[3]
        if (seq is not None and seq < 0) or (cum is not None and cum < 0):
            for table, newest in (("bucket_requests", seq), ("bucket_tokens", cum)):
                if newest is not None and newest < 0:  # dated after now: the clock went back
                    _after_now(self.db, table, bucket, now)
            row = self.db.execute(_BUCKET, arguments).fetchone()
        seq, seq_minute, seq_day, cum, cum_minute, cum_day, declared, reserved, reports = row
        self._reserved[member], self._reports[member] = reserved, reports
        self.last_requests[member] = seq = seq or 0
        cum = cum or 0
        # the running number just before each window (the newest when the window is empty)
        before = (
            seq if seq_minute is None else seq_minute,
            seq if seq_day is None else seq_day,
            cum if cum_minute is None else cum_minute,
            cum if cum_day is None else cum_day,
        )
        self.starts[bucket] = (now, *before)
        self._totals[member] = {
            60.0: (seq - before[0], cum - before[2]),
            rules.DAY: (seq - before[1], cum - before[3]),
        }
        self._bounds.discard(member)
        return _declarations(declared)

    def totals(self, member: int, exact: bool = False) -> dict[float, tuple[int, int]]:
        found = self._totals.get(member)
        if found is None or (exact and member in self._bounds):  # (None: declared by others)
            self._read(member, rules.bucket(self.balancer.members[member]), exact)
            found = self._totals[member]
        return found

    def events(self, member: int, since: float):
        return _events(self.db, rules.bucket(self.balancer.members[member]), since)

    def reserved(self, member: int):
        self.totals(member)  # (read with them)
        entries = _reservations(self._reserved[member])
        latest = self.now + rules.LEASE
        if any(lease > latest for *_, lease in entries):  # the clock was set back since
            self.db.execute(
                "update bucket_reserved set lease = ?1 where bucket = ?2 and lease > ?1",
                [latest, rules.bucket(self.balancer.members[member])],
            )
        return rules.reserved(entries, self.now)

    def history(self, member: int) -> History:
        self.totals(member)  # (read with them)
        return _history(self._reports[member])

    def count(self, member: int, demand=None) -> Ticket | None:
        """Count a request of the member, chosen now: against its bucket's windows when limits
        apply to it (and its own limits declared there), its estimate reserved there under a
        token limit, and in flight under least-busy. Its ticket, or None when nothing was
        counted."""
        counted = counted_ahead(self.balancer, self, member)
        probe = member in self.due
        if not counted and not probe:
            return None
        number = random.getrandbits(62)
        if probe:  # the only prompt sent to it until it ends
            self.db.execute(
                "update cooldowns set until = ?1, known = ?2, reason = case when reason like "
                "?3 || '%' then reason else ?3 || '; ' || coalesce(reason, '') end "
                "where balancer = ?4 and member = ?5",
                [self.now + rules.LEASE, rules.PROBING, rules.PROBE_REASON, self.key, member],
            )
        if not counted:
            return Ticket(False, None, number, probe=True)
        member_limits = self.limits(member)
        own = self.balancer.members[member]
        if member_limits:
            _sent(self.db, rules.bucket(own), self.now, self.last_requests.get(member))
            if own.limits:
                self._declare(member, own)
        tokens = rules.counts_tokens(member_limits)
        need = need_of(self, member, demand)
        reserved = estimate = None
        if need is not None:
            reserved, estimate = need.tokens, need.input
            self.db.execute(
                "insert into bucket_reserved (bucket, id, tokens, blind, at, lease) "
                "values (?, ?, ?, ?, ?, ?)",
                [rules.bucket(own), number, reserved, int(need.blind), self.now,
                 self.now + rules.LEASE],
            )
        if self.balancer.policy != "least-busy":
            return Ticket(tokens, None, number, reserved, estimate, probe)
        self.db.execute(
            "insert into requests (balancer, member, at, seq, total, lease) "
            "values (?, ?, ?, ?, null, ?)",
            [self.key, member, self.now, number, self.now + rules.LEASE],
        )
        return Ticket(tokens, self.now, number, reserved, estimate, probe)

    def _declare(self, member: int, own) -> None:
        "The member's own limits, declared for its bucket (again, when not renewed for a while)."
        source = f"{self.key}#{member}"
        for row in self._declared[member]:  # (rpm, rpd, tpm, tpd, at, source)
            if row[5] == source and rules.declared_lately(row[4], self.now):
                return
        _declare(self.db, source, own, self.now)


# The limits declared for a bucket ?1: their lines, 'rpm|rpd|tpm|tpd|at|source' each (written
# by _declare), ';' between them (sources are 'name:definition#member': neither character)
_DECLARED = "(select group_concat(line, ';') from bucket_limits where bucket = ?1)"
# The reservations of prompts in flight on a bucket ?1: 'tokens|blind|at|lease' each (';')
_RESERVED = (
    "(select group_concat(tokens || '|' || blind || '|' || at || '|' || lease, ';') "
    "from bucket_reserved where bucket = ?1)"
)
# What the last ?5 reports of a bucket ?1 say of the next prompt (``rules.history``, in SQL:
# reading the rows into Python cost 8 us a prompt): of those after ?3 (a day ago) that were
# estimated, 'the largest answer|the most their input exceeded its estimate'
_REPORTS = (
    "(select max(output) || '|' || max(tokens - output - estimate) from (select at, tokens, "
    "estimate, output from bucket_tokens where bucket = ?1 order by at desc, n desc limit ?5) "
    "where estimate is not null and output is not null and at > ?3)"
)
# A bucket's windows: (table, running number, what its row added to it, tie-break column)
_WINDOW_TABLES = (
    ("bucket_requests", "seq", "1", "seq"),
    ("bucket_tokens", "cum", "tokens", "n"),
)


def _running(table: str, running: str, added: str, tie: str, window: str | None) -> str:
    "The newest running number of a bucket's table (window None), or the one before a window."
    if window is None:
        return (
            f"(select case when at > ?4 then -{running} else {running} end from {table} "
            f"where bucket = ?1 order by at desc, {tie} desc limit 1)"
        )
    return (
        f"(select {running} - {added} from {table} where bucket = ?1 and at > {window} "
        f"order by at, {tie} limit 1)"
    )


# What a choice needs of a bucket ?1, in one statement: for its requests, then its tokens, the
# newest row's running number (negative when it is dated after now, ?4: the clock went back)
# and the running number just before the last minute (?2) and the last day (?3) (a window's
# count is two index look-ups, not a scan); _DECLARED, _RESERVED and _REPORTS.
_BUCKET = "select " + ", ".join(
    [_running(*table, window) for table in _WINDOW_TABLES for window in (None, "?2", "?3")]
    + [_DECLARED, _RESERVED, _REPORTS]
)
# The same without the windows' starts (?2 unused), for a choice that knows a bound of them
# (``_FileSnapshot._read``)
_NEWEST = "select " + ", ".join(
    [_running(*table, None) for table in _WINDOW_TABLES] + [_DECLARED, _RESERVED, _REPORTS]
)


def _reservations(text: str | None) -> list[tuple]:
    "(tokens, blind, at, lease) of each reservation that _RESERVED gave."
    if not text:
        return []
    found = []
    for entry in text.split(";"):
        tokens, blind, at, lease = entry.split("|")
        found.append((int(tokens), blind == "1", float(at), float(lease)))
    return found





def _history(text: str | None) -> History:
    """The History that _REPORTS gave (kept per text: the same from prompt to prompt while the
    reports say the same)."""
    return kept(_HISTORIES, text, _parse_history) if text else _NO_HISTORY


def _parse_history(text: str) -> History:
    output, missed = text.split("|")
    return History(int(output), max(int(missed), 0))


_NO_HISTORY = History()
_HISTORIES: dict[str, History] = {}


def _declarations(text: str | None) -> list[tuple]:
    """(rpm, rpd, tpm, tpd, at, source) of each declaration that _DECLARED gave (kept per text:
    the same from prompt to prompt until a declaration is renewed, an hour later)."""
    return kept(_PARSED, text, _parse_declarations) if text else []


def _parse_declarations(text: str) -> list[tuple]:
    found = []
    for entry in text.split(";"):
        *numbers, at, source = entry.split("|")
        found.append((*(int(n) if n else None for n in numbers), float(at), source))
    return found


_PARSED: dict[str, list[tuple]] = {}


def _strictest(own: dict, declared: list, now: float) -> dict:
    """``rules.strictest``, kept per (limits, declarations) while none of the declarations can
    have been forgotten: the same from prompt to prompt."""
    if not declared:
        return own
    cached = _STRICTEST.get((id(declared), id(own)))
    if cached is not None and cached[0] is declared and cached[1] is own and now < cached[3]:
        return cached[2]
    found = rules.strictest(own, declared, now)
    if len(_STRICTEST) > 256:
        _STRICTEST.clear()
    # valid until the oldest declaration is a day old (then it no longer counts)
    oldest = min(row[4] for row in declared)
    _STRICTEST[(id(declared), id(own))] = (declared, own, found, oldest + rules.DAY)
    return found


_STRICTEST: dict[tuple[int, int], tuple] = {}


def _events(db, bucket: str, since: float):
    "(time, 0) of each request, and (time, tokens) of each report, of a bucket since ``since``."
    requests = db.execute(
        "select at, 0 from bucket_requests where bucket = ? and at > ?", [bucket, since]
    ).fetchall()
    spent = db.execute(
        "select at, tokens from bucket_tokens where bucket = ? and at > ?", [bucket, since]
    ).fetchall()
    return requests, spent


def _after_now(db, table: str, bucket: str, now: float) -> None:
    """A bucket's rows dated after now (the clock was set back, or had been ahead) are dated
    now: they stay in the order of their running numbers and are counted against limits for
    one window from now, never for longer."""
    db.execute(  # (or replace: rows numbered alike by an older version become one)
        f"update or replace {table} set at = ? where bucket = ? and at > ?", [now, bucket, now]
    )


def _sent(db, bucket: str, now: float, last: int | None = None) -> None:
    """A request to the bucket, chosen now, numbered after its last (``last``: its number, 0
    for none, when the choice read it already, with no request dated after now; the number
    orders requests chosen at the same time)."""
    if last is None:
        row = db.execute(
            "select at, seq from bucket_requests where bucket = ? order by at desc, seq desc "
            "limit 1",
            [bucket],
        ).fetchone()
        last = 0 if row is None else row[1]
        if row is not None and row[0] > now:
            _after_now(db, "bucket_requests", bucket, now)
    db.execute(
        "insert into bucket_requests (bucket, at, seq) values (?, ?, ?)", [bucket, now, last + 1]
    )


# Tokens ?3 a member of the bucket ?1 reported (?4: the estimate of their input, ?5: their
# answer), numbered after its last report, with their running total, in one statement. Dated
# now (?2), or as the last when that is later (the clock went back): the reports stay in
# order, and the next choice dates them now.
_LAST_TOKENS = "(select {} from bucket_tokens where bucket = ?1 order by at desc, n desc limit 1)"
_SPENT = (
    "insert into bucket_tokens (bucket, at, n, tokens, cum, estimate, output) values (?1, "
    f"max(?2, coalesce({_LAST_TOKENS.format('at')}, ?2)), "
    f"coalesce({_LAST_TOKENS.format('n')}, 0) + 1, ?3, "
    f"coalesce({_LAST_TOKENS.format('cum')}, 0) + ?3, ?4, ?5)"
)


def _probe_ended(db, key: str, member: int, now: float) -> None:
    "A probe that ended with no verdict: its member is due a probe again from now."
    db.execute(
        "update cooldowns set until = ? where balancer = ? and member = ? and known = ?",
        [now, key, member, rules.PROBING],
    )


def _unreserve(db, member, ticket) -> None:
    "A prompt's reservation is no longer: it ended (its report, if any, replaces it)."
    if getattr(ticket, "reserved", None) is not None:
        db.execute(
            "delete from bucket_reserved where bucket = ? and id = ?",
            [rules.bucket(member), ticket.id],
        )


def _ended(db, key: str, member: int, ticket: Ticket, now: float) -> None:
    "A request in flight (least-busy) is no longer: it took from its start until now."
    db.execute(
        "update requests set total = ? - at where balancer = ? and member = ? and at = ? "
        "and seq = ? and total is null",
        [now, key, member, ticket.at, ticket.id],
    )


def _in_flight(db, key: str, now: float) -> dict[int, int]:
    "Prompts in flight per member, across this machine's processes (``rules.in_flight``)."
    rows = db.execute(
        "select member, at, coalesce(lease, 0) from requests where balancer = ? "
        "and total is null and at > ?",
        [key, now - rules.IN_FLIGHT_HOURS * 3600],
    )
    return rules.in_flight(rows, now)


def _latencies(db, balancer: Balancer, key: str, now: float, stream: bool) -> dict[int, float]:
    """Each member's recent latency (``rules.median_latency``); members without one left out.
    (Only the timings of the prompt's kind are fetched, as many as the rule reads.)"""
    column = "first_chunk" if stream else "total"
    found = {}
    for member in range(len(balancer.members)):
        timings = db.execute(
            "select at, first_chunk, total, streamed from outcomes where balancer = ? "
            f"and member = ? and streamed = ? and {column} > 0 and at > ? "
            "order by at desc limit ?",
            [key, member, int(stream), now - rules.RECENT_HOURS * 3600, rules.RECENT_TIMINGS],
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


def _fold(db, name: str, member: int, bucket: str, before: float) -> None:
    """Add the outcomes of a member's rows older than ``before`` to its totals; drop the rows,
    and its bucket's (and declarations not renewed since)."""
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
    for table in ("bucket_requests", "bucket_tokens"):
        db.execute(f"delete from {table} where bucket = ? and at < ?", [bucket, before])
    db.execute("delete from bucket_limits where at < ?", [before])
    # reservations of prompts that never ended (their process died): their leases ran out
    db.execute("delete from bucket_reserved where bucket = ? and lease < ?", [bucket, before])


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
