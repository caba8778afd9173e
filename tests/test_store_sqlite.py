"""What is the SQLite state file's own, beside the store contract (test_store.py): its windows
follow this machine's clock, and rows dated after now (the clock was set back, or had run
ahead) are dated now; rows older than a day are folded into totals. (A Redis server keeps
the time of its own clock, and its keys expire: test_redis.py.) Files of every earlier schema
version (store/migrations.py) are upgraded in place and keep what they counted; a file that
another process is creating is waited for; a file from a newer version is left alone."""

import dataclasses
import os
import random
import sqlite3
import time
from contextlib import closing

import pytest
from conftest import NOW, invoke, save_lb, set_keys
from store_helpers import chosen, echo

from llm_loadbalancer import config, store
from llm_loadbalancer.store import Outcome, migrations, rules
from llm_loadbalancer.store import sqlite as sqlite_store


@pytest.fixture
def local(user_path):
    "local(name, *members, **settings): (a balancer whose state is this machine's file, its store)"

    def make(name, *members, **settings):
        data = {**settings, "members": list(members)}
        balancer = dataclasses.replace(config.from_dict(name, data), user_dir=str(user_path))
        st = store.open_store(balancer, fallback=False)
        assert isinstance(st, sqlite_store.SQLiteStore)
        return balancer, st

    return make


# --- the clock: this machine's (a Redis server's clock is its own) ---------------------------


def test_tokens_reported_after_the_clock_was_set_back_still_count(local):
    balancer, st = local("back", echo(tpm=25), echo(options={"example_bool": True}))
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, Outcome(tokens_in=10), now=NOW)
    st.record(balancer, 0, Outcome(tokens_in=20), now=NOW - 30)  # the clock went back 30 s
    # 30 tokens in the minute: a has no room, whatever the rotation says
    assert [chosen(st, balancer, NOW + step).order[0] for step in (1, 2)] == [1, 1]
    assert st.stats(balancer, now=NOW + 1)[0]["limits"]["tpm"]["used"] == 30


def test_requests_sent_after_the_clock_was_set_back_still_count(local):
    balancer, st = local("back", echo(rpm=3), echo(options={"example_bool": True}))
    sent = [chosen(st, balancer, NOW).order[0]]
    # the clock goes back 30 s, then moves on a second at a time
    sent += [chosen(st, balancer, NOW - 30 + step).order[0] for step in range(10)]
    assert sent.count(0) == 3  # never a 4th request in the minute
    assert st.stats(balancer, now=NOW - 20)[0]["limits"]["rpm"]["used"] == 3
    # two choices at one moment after the clock went back are numbered apart
    same, same_store = local(
        "same", echo(rpm=5), echo(options={"example_bool": True}), policy="failover"
    )
    for now in (NOW, NOW - 30, NOW - 30):
        assert same_store.choose(same, now=now).plan.order[0] == 0
    assert same_store.stats(same, now=NOW - 30)[0]["limits"]["rpm"]["used"] == 3


def test_a_member_full_while_the_clock_ran_ahead_has_room_a_window_after_it_is_corrected(local):
    ahead = NOW + 5 * 3600  # the clock was 5 hours ahead for a few prompts, then corrected
    other = echo(options={"example_bool": True})
    balancer, st = local("ahead", echo(rpm=3), other, policy="failover")
    assert [chosen(st, balancer, ahead + step).order[0] for step in range(3)] == [0, 0, 0]
    assert chosen(st, balancer, NOW + 1).order[0] == 1  # those 3 count from now ...
    assert chosen(st, balancer, NOW + 62).order[0] == 0  # ... for one minute, not five hours
    # tokens reported while it was ahead, the same
    spent, spent_store = local("spent", echo(tpm=100), other, policy="failover")
    ticket = spent_store.choose(spent, now=ahead).ticket
    spent_store.record(spent, 0, Outcome(tokens_in=100), ticket=ticket, now=ahead)
    assert [chosen(spent_store, spent, NOW + step).order[0] for step in (1, 62)] == [1, 0]
    # every member full: the wait is for one window, not for the hours the clock was ahead
    full, full_store = local("full", echo(rpm=1), {**other, "rpm": 1})
    assert [chosen(full_store, full, ahead).order[0] for _ in range(2)] == [0, 1]
    assert full_store.choose(full, now=NOW + 120).plan.wait == (NOW + 180, 0)


# --- windows counted from a bound --------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_windows_read_as_a_bound_hold_every_limit_exactly(local, seed):
    """A choice reads a window's count as a bound (the window's start as this process last read
    it): whatever the times, a member gets exactly the requests and tokens its limits leave room
    for, no more and no fewer, as a count of every window would say."""
    rng = random.Random(seed)
    balancer, st = local(
        "bound", echo(rpm=3, rpd=20, tpm=100), echo(options={"example_bool": True}),
        policy="failover",
    )
    requests, tokens, now = [], [], NOW
    for _ in range(120):
        now += rng.choice([0.5, 3, 11, 29, 40, 61, 300])
        in_minute = [at for at in requests if at > now - 60]
        in_day = [at for at in requests if at > now - 86400]
        spent = sum(count for at, count in tokens if at > now - 60)
        room = len(in_minute) < 3 and len(in_day) < 20 and spent + 1 <= 100
        choice = st.choose(balancer, now=now)
        assert choice.plan.order[0] == (0 if room else 1), (now - NOW, in_minute, spent)
        if room:
            requests.append(now)
            used = rng.choice([0, 10, 45])
            st.record(balancer, 0, Outcome(tokens_in=used), ticket=choice.ticket, now=now)
            if used:
                tokens.append((now, used))
    assert len(requests) == 20  # the day's limit was reached, and held


# --- folding old rows into totals ------------------------------------------------------------


def test_statistics_still_add_up_once_requests_older_than_a_day_are_folded_into_totals(local):
    balancer, st = local("f", echo(tpm=1000), echo())
    st.choose(balancer)  # the definition is on record
    two_days_ago = time.time() - 2 * 86400
    st.record(balancer, 0, Outcome(tokens_in=3, tokens_out=4), now=two_days_ago)
    st.record(balancer, 0, Outcome(error="429 rate limited: slow down"), now=two_days_ago + 1)
    st.record(balancer, 1, Outcome(tokens_in=1, tokens_out=1), now=two_days_ago)
    with closing(sqlite3.connect(store.file_of())) as db:
        old = "select count(*) from outcomes where member = 0 and at < ?"
        assert db.execute(old, [two_days_ago + 10]).fetchone()[0] == 2
        # one record in PRUNE_EVERY (drawn at random, seeded here) folds the member's old rows
        random.seed(5)
        for count in range(1, 50 * sqlite_store.PRUNE_EVERY):
            st.record(balancer, 0, Outcome(tokens_in=1, tokens_out=2))
            if db.execute(old, [two_days_ago + 10]).fetchone()[0] == 0:
                break
        else:
            pytest.fail("the old rows were never folded")
        assert count > 1
        folded = db.execute(
            "select requests, successes, failures, input_tokens, output_tokens, last_error "
            "from stats where balancer like 'f:%' and member = 0"
        ).fetchone()
    assert folded == (2, 1, 1, 3, 4, "429 rate limited: slow down")
    first, second = st.stats(balancer)
    assert (first["requests"], first["successes"], first["failures"]) == (2 + count, 1 + count, 1)
    assert (first["input_tokens"], first["output_tokens"]) == (3 + count, 4 + 2 * count)
    assert first["last_error"] == "429 rate limited: slow down"
    assert first["last_used"] > two_days_ago + 86400  # the latest request, not a folded one
    assert (second["requests"], second["input_tokens"]) == (1, 1)  # not folded: still counted
    assert first["share"] == pytest.approx((2 + count) / (3 + count))


# --- the file's schema, and opening it ------------------------------------------------------

OLD_TABLES = """
create table rotation (balancer text primary key, signature text not null,
    position integer not null default 0);
create table cooldowns (balancer text not null, member integer not null, until real not null,
    reason text, primary key (balancer, member));
create table stats (balancer text not null, member integer not null,
    requests integer not null default 0, successes integer not null default 0,
    failures integer not null default 0, last_used real, last_error text,
    primary key (balancer, member));
create table affinity (balancer text not null, conversation text not null,
    first_member integer not null, last_member integer not null, updated real not null,
    primary key (balancer, conversation));
"""


def test_a_state_file_from_0_1_0_is_upgraded_and_keeps_rotation_and_statistics(user_path):
    save_lb("x", "echo", "echo example_bool=true", "echo")
    balancer = config.load("x")
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        db.executescript(OLD_TABLES)
        db.execute("insert into rotation values ('x', ?, 2)", [balancer.signature])
        db.execute("insert into stats values ('x', 0, 5, 5, 0, 1.0, null)")
        db.execute("insert into cooldowns values ('x', 1, ?, 'inf')", [1e300])
    plan = store.open_store(balancer).choose(balancer).plan
    assert plan.order[0] == 2  # the rotation went on where it was
    members = store.open_store(balancer).stats(balancer)
    assert members[0]["requests"] == 5
    assert members[1]["cooling_down_until"] <= time.time() + config.MAX_SECONDS + 1
    assert_upgraded(user_path)


def old_state_file(user_path, version, balancer):
    """A state file with the tables of an older version, and the balancer's rotation on record
    (in place of the one llm lb save made)."""
    store.new_process()
    for path in user_path.glob("loadbalancers.db*"):
        path.unlink()
    db = sqlite3.connect(user_path / "loadbalancers.db")
    for step in migrations.MIGRATIONS[:version]:
        step(db)
    db.execute(f"pragma user_version = {version}")
    db.execute("insert into rotation values ('x', ?, 0)", [balancer.signature])
    return db


def assert_upgraded(user_path):
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma user_version").fetchone()[0] == migrations.VERSION


def test_a_state_file_of_version_3_is_upgraded_and_keeps_counting_its_requests_and_tokens(
    user_path,
):
    set_keys(user_path, a="key-a", b="key-b")  # (each member its own provider's bucket)
    save_lb("x", "echo key=a rpm=1", "echo key=b tpm=100")
    balancer = config.load("x")
    now = time.time()
    with old_state_file(user_path, 3, balancer) as db:
        # what version 3 kept: rows under a rowid, each indexed apart
        db.execute(
            "insert into requests (id, balancer, member, at, seq, total) "
            "values (7, 'x', 0, ?, 1, 0.5)",
            [now - 10],
        )
        db.execute(
            "insert into spent (id, balancer, member, at, tokens, cum) "
            "values (3, 'x', 1, ?, 150, 150)",
            [now - 10],
        )
        # version 3 counted each outcome in stats as it was recorded, its row besides
        db.execute(
            "insert into stats (balancer, member, requests, successes, failures, last_used, "
            "input_tokens, output_tokens) values ('x', 0, 4, 4, 0, ?, 40, 60)",
            [now - 10],
        )
        db.execute(
            "insert into requests (id, balancer, member, at, tokens, total, streamed) "
            "values (8, 'x', 0, ?, 100, 0.5, 1)",
            [now - 20],
        )
    choice = store.open_store(balancer).choose(balancer, now=now)
    assert choice.plan.order == ()  # both at their limits, as before the upgrade
    assert choice.plan.wait == (pytest.approx(now + 50), 0)
    members = store.open_store(balancer).stats(balancer, now=now)
    assert [member["limits"] for member in members] == [
        {"rpm": {"used": 1, "limit": 1}},
        {"tpm": {"used": 150, "limit": 100, "reserved": 0}},
    ]
    # what stats had counted is counted once
    assert (members[0]["requests"], members[0]["input_tokens"]) == (4, 40)
    assert_upgraded(user_path)


def test_a_state_file_of_version_4_is_upgraded_and_keeps_its_counts_outcomes_and_tokens(
    user_path,
):
    set_keys(user_path, a="key-a", b="key-b")  # (each member its own provider's bucket)
    save_lb("x", "echo key=a rpm=1", "echo key=b tpm=100")
    balancer = config.load("x")
    now = time.time()
    with old_state_file(user_path, 4, balancer) as db:
        # what version 4 kept: a request counted in advance, its outcome on its row ...
        db.execute(
            "insert into requests (balancer, member, at, id, seq, total, streamed, input_tokens, "
            "output_tokens, ended) values ('x', 0, ?, 1, 1, 0.5, 1, 3, 5, ?)",
            [now - 10, now - 9.5],
        )
        # ... an outcome recorded when it ended, and its tokens reported apart
        db.execute(
            "insert into requests (balancer, member, at, id, total, streamed, input_tokens, "
            "output_tokens, error, ended) values ('x', 1, ?, 77, 0.5, 1, 100, 50, null, ?)",
            [now - 20, now - 19.5],
        )
        for at, cum, tokens in ((now - 50, 30, 30), (now - 19.5, 180, 150)):
            db.execute(
                "insert into spent (balancer, member, at, cum, tokens) values ('x', 1, ?, ?, ?)",
                [at, cum, tokens],
            )
        db.execute(
            "insert into stats (balancer, member, requests, successes, failures, last_used, "
            "input_tokens, output_tokens) values ('x', 0, 4, 4, 0, ?, 40, 60)",
            [now - 100],
        )
    choice = store.open_store(balancer).choose(balancer, now=now)
    assert choice.plan.order == ()  # both at their limits, as before the upgrade
    # member 2 frees up first: a minute after its last tokens were reported
    assert choice.plan.wait == (pytest.approx(now + 40.5, abs=0.01), 1)
    members = store.open_store(balancer).stats(balancer, now=now)
    assert [member["limits"] for member in members] == [
        {"rpm": {"used": 1, "limit": 1}},
        {"tpm": {"used": 180, "limit": 100, "reserved": 0}},
    ]
    # what choices count: 30 tokens until now + 10, and 150 until now + 40.5
    assert store.open_store(balancer).claim(balancer, 1, now=now + 40) is False
    assert store.open_store(balancer).claim(balancer, 1, now=now + 41) not in (None, False)
    # each outcome counted once, with its tokens and when it ended
    assert [(m["requests"], m["input_tokens"], m["output_tokens"]) for m in members] == [
        (5, 43, 65),
        (1, 100, 50),
    ]
    assert members[1]["last_used"] == pytest.approx(now - 19.5)
    # and the tokens reported from now on are added to the running total
    store.open_store(balancer).record(balancer, 1, Outcome(tokens_in=7, tokens_out=3), now=now + 1)
    assert store.open_store(balancer).stats(balancer, now=now + 1)[1]["limits"]["tpm"] == {
        "used": 190,
        "limit": 100,
        "reserved": 0,
    }
    assert_upgraded(user_path)


def test_a_new_state_file_that_another_process_is_creating_is_waited_for(user_path, monkeypatch):
    # Another process holds the new file (creating its tables, before WAL mode): SQLite refuses
    # to turn it to WAL at once, without its busy timeout. The prompt waits for the file instead
    # of going without it (seen as 'database is locked' when processes start together).
    save_lb("x", "echo", "echo")
    other = sqlite3.connect(user_path / "loadbalancers.db", isolation_level=None)
    other.execute("create table creating (x)")
    other.execute("begin immediate")
    other.execute("insert into creating values (1)")
    pauses = []

    def pause(seconds):  # the other process is done by the time this one tries again
        pauses.append(seconds)
        if other.in_transaction:
            other.execute("commit")

    monkeypatch.setattr(sqlite_store.SQLiteStore, "pause", staticmethod(pause))
    balancer = config.load("x")
    assert store.open_store(balancer).choose(balancer).plan.order[0] == 0
    assert len(pauses) == 1
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_a_state_file_from_a_newer_version_is_not_touched(user_path, monkeypatch):
    save_lb("x", "echo", "echo")
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        db.execute(f"pragma user_version = {migrations.VERSION + 1}")
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0
    assert "from a newer llm-loadbalancer" in result.stderr
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma user_version").fetchone()[0] == migrations.VERSION + 1


# --- the file's own safety -------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
def test_the_state_file_and_its_wal_are_private_to_their_user(user_path):
    save_lb("x", "echo", "echo")
    balancer = config.load("x")
    store.open_store(balancer).choose(balancer)  # the connection stays open: -wal, -shm exist
    files = sorted(user_path.glob("loadbalancers.db*"))
    assert [path.name for path in files] == [
        "loadbalancers.db",
        "loadbalancers.db-shm",
        "loadbalancers.db-wal",
    ]
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {"0o600"}


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
def test_a_state_file_an_earlier_version_made_readable_by_others_becomes_private(user_path):
    save_lb("x", "echo", "echo")
    balancer = config.load("x")
    store.open_store(balancer).choose(balancer)
    store.new_process()  # the connection of that process is gone; the next one opens the file
    for path in user_path.glob("loadbalancers.db*"):
        path.chmod(0o644)
    assert store.open_store(balancer).choose(balancer).plan.order[0] == 1  # the rotation kept
    assert {p.stat().st_mode & 0o777 for p in user_path.glob("loadbalancers.db*")} == {0o600}


def test_a_state_file_that_is_a_link_is_never_written_through(user_path, tmp_path):
    save_lb("x", "echo", "echo")
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    try:
        (user_path / "loadbalancers.db").symlink_to(target)
    except OSError:  # (Windows: making a link needs Developer Mode or an administrator)
        pytest.skip("this account cannot make a symbolic link")
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0, result.output  # answered, without the state
    assert "cannot use its state file" in result.stderr and "it is a link" in result.stderr
    assert target.read_bytes() == b""
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "llm-user") == [
        "elsewhere.db"  # no journal beside the link's target
    ]
    stats = invoke("lb", "stats", "x")
    assert stats.exit_code == 1
    assert stats.stderr.startswith("Error: cannot read statistics: ")
    assert "it is a link" in stats.stderr and len(stats.stderr.splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX's")
def test_a_state_file_that_is_not_a_regular_file_is_not_opened(user_path):
    save_lb("x", "echo", "echo")
    os.mkfifo(user_path / "loadbalancers.db")
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0, result.output
    assert "it is not a regular file: move it away" in result.stderr


# --- a file that cannot be used: this process's memory answers, and limits still hold --------


def test_limits_still_hold_within_the_process_when_the_file_is_damaged(user_path):
    set_keys(user_path, a="key-a", b="key-b")
    save_lb("x", "echo key=a rpm=2", "echo key=b rpm=2", flags=("--max-wait", "0"))
    store.new_process()  # (llm lb save opened the file: the prompts are another process)
    for path in user_path.glob("loadbalancers.db*"):
        path.unlink()
    (user_path / "loadbalancers.db").write_bytes(b"this is not a database" * 100)
    results = [invoke("-m", "lb:x", f"prompt {n}") for n in range(5)]
    assert [r.exit_code for r in results] == [0, 0, 0, 0, 1]  # 2 a minute per key, not 16
    assert "every member is at its limit" in results[4].output
    warning = results[0].stderr
    assert "cannot use its state file" in warning and "the file is damaged" in warning
    assert "now hold only within this process" in warning and len(warning.splitlines()) == 1
    assert all(r.stderr == "" for r in results[1:4])  # one warning per process


def test_a_locked_file_costs_a_process_one_wait_not_one_per_prompt(user_path, monkeypatch):
    monkeypatch.setenv("LLM_LOADBALANCER_STATE_TIMEOUT", "0.2")  # (the wait, read on opening)
    save_lb("x", "echo", "echo")
    balancer = config.load("x")
    store.open_store(balancer).choose(balancer)  # the file exists
    store.new_process()
    waits = []
    begin = sqlite_store._Transaction.__enter__

    def counted(transaction):  # each time the file's lock is asked for
        if transaction.store.path != ":memory:":
            waits.append(transaction.store.path)
        return begin(transaction)

    monkeypatch.setattr(sqlite_store._Transaction, "__enter__", counted)
    holder = sqlite3.connect(user_path / "loadbalancers.db", isolation_level=None)
    holder.execute("begin exclusive")
    try:
        results = [invoke("-m", "lb:x", f"prompt {n}") for n in range(4)]
    finally:
        holder.execute("rollback")
    assert [r.exit_code for r in results] == [0, 0, 0, 0]
    assert len(waits) == 1  # later prompts of the process go straight to its memory
    assert "it is busy: another process holds its lock; try again" in results[0].stderr


def test_reset_remove_and_save_say_at_once_that_a_locked_file_could_not_be_cleared(
    user_path, monkeypatch
):
    monkeypatch.setenv("LLM_LOADBALANCER_STATE_TIMEOUT", "600")  # commands do not wait for it
    save_lb("x", "echo", "echo")
    assert invoke("-m", "lb:x", "hi").exit_code == 0
    holder = sqlite3.connect(user_path / "loadbalancers.db", isolation_level=None)
    holder.execute("begin exclusive")
    try:
        reset = invoke("lb", "reset", "x")
        saved = invoke("lb", "save", "x", "echo", "echo example_bool=true", "--force")
        removed = invoke("lb", "remove", "x")
    finally:
        holder.execute("rollback")
    assert reset.exit_code == 1
    assert reset.stderr.startswith("Error: cannot reset lb:x: ")
    assert "it is busy: another process holds its lock; try again" in reset.stderr
    assert len(reset.stderr.splitlines()) == 1
    assert saved.exit_code == 0
    assert "Warning: lb:x: the state could not be updated (" in saved.stderr
    assert removed.exit_code == 0 and not (user_path / "loadbalancers" / "x.yaml").exists()
    assert "Warning: lb:x: its state could not be cleared (" in removed.stderr


def test_a_full_disk_is_said_plainly(user_path):
    problem = sqlite_store.SQLiteStore(str(user_path / "loadbalancers.db"))
    with pytest.raises(store.StateUnavailable, match="the disk is full: free some space"):
        problem.unavailable(sqlite3.OperationalError("database or disk is full"))


def test_a_process_renews_the_leases_of_its_prompts_in_flight_until_they_end(user_path):
    save_lb("x", "echo", "echo", flags=("--policy", "least-busy"))
    balancer = config.load("x")
    st = store.open_store(balancer)
    choice = st.choose(balancer, now=NOW)
    leases = store.process_leases()
    leases.hold(st, balancer, 0, choice.ticket)
    assert leases.thread.daemon and leases.thread.is_alive()
    assert leases.renew(now=NOW + 40) == 1
    assert in_flight_now(st, balancer, NOW + 80) == "1: 1, 2: 0"  # renewed at 40: until 85
    leases.release(choice.ticket)
    assert leases.renew(now=NOW + 80) == 0
    assert in_flight_now(st, balancer, NOW + 86) == "1: 0, 2: 0"


def in_flight_now(st, balancer, now) -> str:
    why = chosen(st, balancer, now).why
    return why[why.index(": ") + 2 : -1]


def test_a_version_5_file_s_requests_of_members_sharing_a_key_count_together(user_path):
    save_lb("x", "echo rpm=4", "echo rpm=4", flags=("--max-wait", "0"))  # one model, one key
    balancer = config.load("x")
    now = time.time()
    with old_state_file(user_path, 5, balancer) as db:  # 2 requests each, numbered apart
        for member, seq in ((0, 1), (1, 1), (0, 2), (1, 2)):
            db.execute(
                "insert into requests (balancer, member, at, seq, total) "
                "values ('x', ?, ?, ?, 0)",
                [member, now - 10 + seq + member / 10, seq],
            )
    choice = store.open_store(balancer).choose(balancer, now=now)
    assert choice.plan.order == ()  # the key has had its 4 requests of the minute
    assert store.open_store(balancer).stats(balancer, now=now)[0]["limits"]["rpm"]["used"] == 4


def test_limits_declared_in_a_version_6_file_still_apply(user_path):
    save_lb("x", "echo", "echo", flags=("--max-wait", "0"))
    balancer = config.load("x")
    now = time.time()
    with old_state_file(user_path, 6, balancer) as db:  # another balancer's rpm=1 for the key
        db.execute(
            "insert into bucket_limits (bucket, source, rpm, at) values (?, 'y:0123abcd#0', 1, ?)",
            [rules.bucket(balancer.members[0]), now - 60],
        )
    st = store.open_store(balancer)
    assert st.choose(balancer, now=now).plan.order != ()
    assert st.choose(balancer, now=now + 1).plan.order == ()  # the key's request of the minute
    assert st.stats(balancer, now=now + 1)[1]["limits"] == {"rpm": {"used": 1, "limit": 1}}
    assert_upgraded(user_path)


def test_a_value_in_the_file_this_version_cannot_read_never_fails_a_prompt(user_path):
    set_keys(user_path, a="key-a")
    save_lb("x", "echo key=a rpm=5", "echo")
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        db.execute("update bucket_limits set line = 'abc'")
    store.new_process()
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0, result.output
    assert "it holds a value this version cannot read" in result.stderr
    assert len(result.stderr.splitlines()) == 1
