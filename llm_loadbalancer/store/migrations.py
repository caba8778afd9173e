"""The state file's schema: each step takes the file from version N to N + 1 (``pragma
user_version``), in order, the way llm keeps its own (``llm/migrations.py``). ``upgrade`` runs
the steps a file lacks in one write transaction, so that concurrent processes upgrade it once.

A file made before versions were kept (0.1.0, version 0) has the tables of step 1 already,
which step 1 creates only where they are missing. Add a step at the end; never change one that
has shipped: files out there are at every version.
"""

from __future__ import annotations

from ..config import MAX_SECONDS

MIGRATIONS = []
migration = MIGRATIONS.append


def run(db, script: str) -> None:
    "Each statement of a step's script (``executescript`` would commit the transaction)."
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


# 0 -> 1: rotation, cooldowns, statistics and conversation ties (0.1.0); a Retry-After of
# inf or nan that 0.1.0 stored ends now, and none is longer than MAX_SECONDS.
@migration
def m001_tables(db):
    run(
        db,
        """
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
""".format(max_seconds=int(MAX_SECONDS)),
    )


# 1 -> 2: limits, stated (``known``) and escalating cooldowns, tokens and timings (issues 10, 11). One row
# per request sent, with its timings (statistics, lowest-latency) and, for a member with limits
# or under least-busy, made when it is chosen (in flight until it ends); ``seq`` numbers a
# member's requests, so that a window's count is two index look-ups, not a scan. ``spent``
# records the tokens a member reported, with their running total (``cum``) for the same
# reason. Rows older than the longest window (a day) are pruned as new ones are recorded.
@migration
def m002_limits_timings_and_tokens(db):
    run(
        db,
        """
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
""",
    )


# 2 -> 3: the items of an embedding balancer's batches (issue 13)
@migration
def m003_embedding_items(db):
    run(
        db,
        """
alter table stats add column items integer not null default 0;
""",
    )


# 3 -> 4 (issue 10's cost budget): fewer pages written per prompt. Requests and token reports
# are kept in the order of their index (without rowid): one page each, not two. A request's row
# is named by (balancer, member, at, id): a request counted against limits has its number
# (``seq``) for id, so that requests chosen at the same time stay in order; one recorded only
# when it ended, a random id. The row carries its outcome (tokens, error, items, when it
# ended); ``stats`` holds the totals of the rows pruned after a day (and of those it counted
# before version 4: ``counted``), which ``stats()`` adds to the others.
@migration
def m004_fewer_pages(db):
    run(
        db,
        """
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
""",
    )


# 4 -> 5 (issue 10's cost budget): an outcome is a row of its own, so that recording it writes
# one row (after reading the member's last), not an update of its request's row and a row for
# its tokens. ``requests`` keeps the requests counted in advance (limits, least-busy), each
# named by its number; ``outcomes`` keeps what each attempt ended with, numbered in the order
# they ended (``n``), with the running total of the tokens counted against limits (``cum``),
# which replaces ``spent``. The outcomes a version-4 file kept, and its token reports, become
# rows of ``outcomes``, numbered and summed in the order they came.
@migration
def m005_outcomes_of_their_own(db):
    run(
        db,
        """
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
""",
    )


# 5 -> 6 (issue 20): a limit belongs to the provider's bucket (a model and a stored key), not to
# a balancer. The requests counted against limits and the tokens reported are kept per bucket
# (``bucket_requests``, ``bucket_tokens``: numbered as ``requests`` and ``outcomes`` were), and
# every member declares its limits for its bucket (``bucket_limits``, per ``source``: a member
# of one definition), so that the strictest applies to all. Every other table keys a balancer
# by ``name:definition`` (``sqlite._key``): a definition keeps its own rotation, statistics,
# cooldowns and ties, and a process holding an older one never resets the newer one's. Rows
# kept under a bare name by version 5 are taken over by its definition on first use (their
# windows copied to the buckets). A prompt in flight counts while its ``lease`` lasts.
@migration
def m006_buckets(db):
    run(
        db,
        """
create table bucket_requests (
    bucket text not null,
    at real not null,
    seq integer not null,
    primary key (bucket, at, seq)
) without rowid;
create table bucket_tokens (
    bucket text not null,
    at real not null,
    n integer not null,
    tokens integer not null,
    cum integer not null,
    primary key (bucket, at, n)
) without rowid;
create table bucket_limits (
    bucket text not null,
    source text not null,
    rpm integer,
    rpd integer,
    tpm integer,
    tpd integer,
    at real not null,
    primary key (bucket, source)
) without rowid;
alter table requests add column lease real;
""",
    )


# 6 -> 7: each declared limit also kept as the line a choice reads ('rpm|rpd|tpm|tpd|at|source',
# ``sqlite._declarations``), written once when it is declared: building it from the columns in
# every choice cost a third of the statement that reads a bucket.
@migration
def m007_declaration_lines(db):
    run(
        db,
        """
alter table bucket_limits add column line text;
update bucket_limits set line = coalesce(rpm, '') || '|' || coalesce(rpd, '') || '|' ||
    coalesce(tpm, '') || '|' || coalesce(tpd, '') || '|' || at || '|' || source;
""",
    )


# 7 -> 8: token reservations (issue 21): a prompt chosen for a member with a token limit
# reserves its estimate in ``bucket_reserved`` until its member reports (while its lease
# lasts); a report keeps the estimate of its input and its answer's tokens, from which the next
# prompts' are estimated (``rules.history``).
@migration
def m008_reservations(db):
    run(
        db,
        """
alter table bucket_tokens add column estimate integer;
alter table bucket_tokens add column output integer;
create table bucket_reserved (
    bucket text not null,
    id integer not null,
    tokens integer not null,
    blind integer not null,
    at real not null,
    lease real not null,
    primary key (bucket, id)
) without rowid;
""",
    )


# 8 -> 9: prompt-cache affinity (issue 21): the prompts each definition sent to their prefix's
# member (a prefix's tie is a row of ``affinity``, named ``prefix:`` and its digest).
@migration
def m009_affinity_routed(db):
    run(db, "alter table rotation add column routed integer not null default 0")


VERSION = len(MIGRATIONS)


class TooNew(Exception):
    "The file is of a later version than this code knows."


def upgrade(db) -> None:
    "Bring the file to VERSION, one step at a time, in one write transaction."
    if db.execute("pragma user_version").fetchone()[0] == VERSION:
        return
    db.execute("begin immediate")
    try:
        version = db.execute("pragma user_version").fetchone()[0]
        if version > VERSION:
            raise TooNew(
                f"its tables are version {version}, from a newer llm-loadbalancer than this one "
                f"(which knows version {VERSION}): upgrade llm-loadbalancer"
            )
        for step in MIGRATIONS[version:]:
            step(db)
        db.execute(f"pragma user_version = {VERSION}")
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")
