"""What holds across prompts and processes: rotation, cooldowns, conversation ties, statistics.

One SQLite file, ``llm.user_dir()/loadbalancers.db``, in WAL mode with a busy timeout. Each
selection is one write transaction (``BEGIN IMMEDIATE``), so concurrent ``llm`` processes
take turns exactly. When the file cannot be used, callers get ``StateUnavailable`` and carry on
without it (``model.py`` warns once).
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import llm

from .config import MAX_SECONDS, Balancer
from .policy import Plan, plan

FILENAME = "loadbalancers.db"
TIMEOUT_ENV = "LLM_LOADBALANCER_STATE_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
AFFINITY_DAYS = 30

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
MIGRATIONS = (SCHEMA_V1.format(max_seconds=int(MAX_SECONDS)),)
VERSION = len(MIGRATIONS)


class StateUnavailable(Exception):
    "The state file cannot be used (corrupt, read-only, locked past the timeout, too new)."


_paths: dict = {}


def path() -> Path:
    "The state file in llm.user_dir(), found once per LLM_USER_PATH value."
    user_path = os.environ.get("LLM_USER_PATH")
    found = _paths.get(user_path)
    if found is None:
        found = _paths[user_path] = llm.user_dir() / FILENAME
    return found


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


def _connect(file: Path) -> sqlite3.Connection:
    key = str(file)
    db = _connections.get(key)
    if db is None:
        db = sqlite3.connect(key, timeout=timeout(), isolation_level=None, check_same_thread=False)
        try:
            db.execute("pragma journal_mode=wal")
            db.execute("pragma synchronous=normal")
            _upgrade(db)
        except BaseException:
            db.close()
            raise
        _connections[key] = db
    return db


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


@contextmanager
def transaction(write: bool = True):
    "A connection inside one transaction; every failure of the file becomes StateUnavailable."
    file = path()
    with _lock:
        try:
            db = _connect(file)
            db.execute("begin immediate" if write else "begin")
            try:
                yield db
            except BaseException:
                db.execute("rollback")
                raise
            else:
                db.execute("commit")
        except StateUnavailable as ex:
            raise StateUnavailable(f"{file}: {ex}") from ex
        except (sqlite3.Error, OSError) as ex:
            _connections.pop(str(file), None)
            hint = ""
            if "not a database" in str(ex) or "malformed" in str(ex):
                hint = (
                    ": the file is damaged; move it away (rotation, cooldowns and statistics "
                    "start afresh)"
                )
            raise StateUnavailable(f"{file}: {ex}{hint}") from ex


def _sync_signature(db, balancer: Balancer) -> int:
    "The stored rotation position; a changed member list starts everything again."
    row = db.execute(
        "select signature, position from rotation where balancer = ?", [balancer.name]
    ).fetchone()
    signature = balancer.signature
    if row is not None and row[0] == signature:
        return row[1]
    _clear(db, balancer.name)
    db.execute(
        "insert into rotation (balancer, signature, position) values (?, ?, 0)",
        [balancer.name, signature],
    )
    return 0


def _clear(db, name: str) -> None:
    for table in ("rotation", "cooldowns", "stats", "affinity"):
        db.execute(f"delete from {table} where balancer = ?", [name])


def select(
    balancer: Balancer,
    *,
    conversation: str | None = None,
    tool_turn: bool = False,
    unavailable: frozenset[int] = frozenset(),
    now: float | None = None,
) -> Plan:
    """Choose the order of members for one prompt and move the rotation, in one transaction.

    ``tool_turn``: the prompt carries tool results for the previous turn of ``conversation``,
    which goes back to the member that made the calls. With ``sticky`` every turn of a
    conversation starts at the member that answered its first turn.
    """
    now = time.time() if now is None else now
    with transaction() as db:
        position = _sync_signature(db, balancer)
        cooling = dict(
            db.execute(
                "select member, until from cooldowns where balancer = ? and until > ?",
                [balancer.name, now],
            ).fetchall()
        )
        pinned = preferred = None
        if conversation and (tool_turn or balancer.sticky):
            row = db.execute(
                "select first_member, last_member from affinity "
                "where balancer = ? and conversation = ?",
                [balancer.name, conversation],
            ).fetchone()
            if row is not None:
                if tool_turn:
                    pinned = row[1]
                else:
                    preferred = row[0]
        result = plan(
            balancer.policy,
            len(balancer.members),
            position,
            cooling,
            now,
            pinned=pinned,
            preferred=preferred,
            unavailable=unavailable,
        )
        if result.position != position:
            db.execute(
                "update rotation set position = ? where balancer = ?",
                [result.position, balancer.name],
            )
        return result


def record(
    balancer: Balancer,
    member: int,
    *,
    error: str | None = None,
    cooldown: float | None = None,
    conversation: str | None = None,
    now: float | None = None,
) -> None:
    """Record one attempt: its outcome in the statistics, a cooldown after a failure, and
    for a success the member now tied to the conversation."""
    now = time.time() if now is None else now
    name = balancer.name
    with transaction() as db:
        db.execute(
            "insert into stats (balancer, member, requests, successes, failures, last_used, "
            "last_error) values (?, ?, 1, ?, ?, ?, ?) on conflict do update set "
            "requests = requests + 1, successes = successes + excluded.successes, "
            "failures = failures + excluded.failures, last_used = excluded.last_used, "
            "last_error = coalesce(excluded.last_error, last_error)",
            [name, member, int(error is None), int(error is not None), now, error],
        )
        if cooldown:
            cooldown = min(cooldown, MAX_SECONDS)  # every cooldown is capped, whatever its source
            db.execute(
                "insert into cooldowns (balancer, member, until, reason) values (?, ?, ?, ?) "
                "on conflict do update set until = excluded.until, reason = excluded.reason",
                [name, member, now + cooldown, error],
            )
        if error is None and conversation:
            # Ties older than AFFINITY_DAYS are forgotten as new ones are made (indexed).
            db.execute("delete from affinity where updated < ?", [now - AFFINITY_DAYS * 86400])
            db.execute(
                "insert into affinity (balancer, conversation, first_member, last_member, "
                "updated) values (?, ?, ?, ?, ?) on conflict do update set "
                "last_member = excluded.last_member, updated = excluded.updated",
                [name, conversation, member, member, now],
            )


def reset(name: str) -> None:
    "Start the rotation again at the first member and forget cooldowns, ties and statistics."
    with transaction() as db:
        _clear(db, name)


def stats(balancer: Balancer, now: float | None = None) -> list[dict]:
    "Per-member statistics, one dict per member in the order of the definition."
    now = time.time() if now is None else now
    with transaction(write=False) as db:
        row = db.execute(
            "select signature from rotation where balancer = ?", [balancer.name]
        ).fetchone()
        current = row is not None and row[0] == balancer.signature
        rows = {}
        cooling = {}
        if current:
            rows = {
                r[0]: r[1:]
                for r in db.execute(
                    "select member, requests, successes, failures, last_used, last_error "
                    "from stats where balancer = ?",
                    [balancer.name],
                )
            }
            cooling = {
                r[0]: r[1:]
                for r in db.execute(
                    "select member, until, reason from cooldowns where balancer = ? and until > ?",
                    [balancer.name, now],
                )
            }
    total = sum(r[0] for r in rows.values())
    result = []
    for index in range(len(balancer.members)):
        requests, successes, failures, last_used, last_error = rows.get(
            index, (0, 0, 0, None, None)
        )
        until = cooling.get(index, (None, None))[0]
        if until is not None and not math.isfinite(until):
            until = now + MAX_SECONDS
        result.append(
            {
                "member": index + 1,
                "requests": requests,
                "successes": successes,
                "failures": failures,
                "share": (requests / total) if total else 0.0,
                "last_used": last_used,
                "last_error": last_error,
                "cooling_down_until": until,
            }
        )
    return result
