"""Hostile files, extreme values and unwritable folders never hurt llm (issue 9): each gives
one line (an error, or a warning) and llm keeps working; nothing is lost."""

import json
import math
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import folder_snapshot, invoke, process_env, save_lb
from llm_loadbalancer import config, state

FOLDER = "loadbalancers"


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def write_file(user_path, name, content):
    folder = user_path / FOLDER
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def llm_still_works():
    models = invoke("models")
    assert models.exit_code == 0 and "echo" in models.stdout
    answer = invoke("-m", "echo", "still works")
    assert answer.exit_code == 0 and "still works" in answer.stdout
    return models.stdout


# --- bounded parsing -----------------------------------------------------------------------

BILLION_LAUGHS = "\n".join(
    ["a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["members:", "  - model: echo", "    options: {example_bool: *i}", "  - echo"]
)


def test_a_yaml_alias_bomb_is_refused_at_once(user_path):
    write_file(user_path, "bomb.yaml", BILLION_LAUGHS)
    listed = llm_still_works()
    assert "lb:bomb (broken: " in listed
    assert "YAML anchors and aliases (&name, *name) are not allowed" in listed
    one_line_error(invoke("-m", "lb:bomb", "hi"), "lb:bomb: ", "anchors and aliases")


def test_a_file_over_the_size_limit_is_refused_without_reading_it(user_path):
    members = "".join("  - echo\n" for _ in range(20_000))
    write_file(user_path, "huge.yaml", "members:\n" + members)
    listed = llm_still_works()
    assert "a balancer file is at most 65,536 bytes" in listed


def test_too_many_members_are_refused(user_path):
    write_file(user_path, "many.yaml", "members: [" + ", ".join(["echo"] * 101) + "]\n")
    one_line_error(invoke("lb", "show", "many"), "101 members: a load balancer has at most 100")
    result = invoke("lb", "save", "many2", *["echo"] * 101)
    one_line_error(result, "101 members")


def test_duplicate_keys_are_refused(user_path):
    write_file(user_path, "dup.yaml", "members: [echo, echo]\npolicy: failover\nmembers: [echo]\n")
    one_line_error(invoke("lb", "show", "dup"), "duplicate key 'members' (line 3)")


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "the definition is empty"),
        ("- echo\n", "not a list"),
        ("members: [echo, echo]\ncooldown: lots\n", "cooldown must be a number of seconds >= 0"),
        ("members: [{model: echo, options: {example_bool: " + "x" * 5000 + "}}]\n", "..."),
    ],
)
def test_messages_say_what_is_wrong_in_the_users_words(user_path, content, message):
    write_file(user_path, "bad.yaml", content)
    line = one_line_error(invoke("-m", "lb:bad", "hi"), message)
    assert len(line) < 400  # a value from the file is cut short, never quoted whole


def test_a_long_value_is_cut_short_in_listings(run_llm):
    save_lb("long", "echo", "echo")
    path = config.path_for("long")
    path.write_text(f"members: [echo, {{model: echo, key: {'k' * 5000}}}]\n")
    listed = run_llm("lb", "list").stdout
    assert max(len(line) for line in listed.splitlines()) < 400


def test_cooldown_given_as_1e3_reads_as_a_number_and_1e300_is_refused_everywhere(run_llm):
    save_lb("c", "echo", "echo", flags=("--cooldown", "1e3"))
    assert config.load("c").cooldown == 1000.0
    for flags in (("--cooldown", "1e300"), ("--cooldown", "1e20"), ("--cooldown", "inf")):
        result = run_llm("lb", "save", "c", "echo", "echo", "--force", *flags)
        one_line_error(result, "cooldown must be a number of seconds >= 0 and at most 86400")
    config.path_for("c").write_text("members: [echo, echo]\ncooldown: 1e300\n")
    one_line_error(run_llm("lb", "show", "c"), "at most 86400 (one day), not '1e300'")


# --- bounded time ----------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["inf", "1e300", "nan", "-5", "soon"])
def test_an_absurd_retry_after_falls_back_to_the_balancers_cooldown(
    fake_models, run_llm, retry_after
):
    save_lb("x", f"flaky name=a fail=429:{retry_after}", "flaky name=b", flags=("--cooldown", "7"))
    before = time.time()
    answer = run_llm("-m", "lb:x", "hi")
    assert answer.stdout.strip() == "answer from b"
    result = run_llm("lb", "stats", "x", "--json")
    assert result.exit_code == 0
    until = json.loads(result.stdout)[0]["members"][0]["cooling_down_until"]  # valid JSON
    expected = 0 if retry_after == "-5" else 7
    if expected:
        assert before + 6 <= until <= time.time() + 8
    assert run_llm("lb", "stats").exit_code == 0


def test_a_cooldown_stored_by_an_older_version_is_capped_and_stats_never_crash(
    fake_models, run_llm
):
    save_lb("x", "flaky name=a", "flaky name=b")
    run_llm("-m", "lb:x", "hi")
    with sqlite3.connect(state.path()) as db:  # what 0.1.0 stored for Retry-After: inf
        db.execute(
            "insert into cooldowns (balancer, member, until, reason) values ('x', 0, ?, 'inf')",
            [math.inf],
        )
    result = run_llm("lb", "stats", "x", "--json")
    assert result.exit_code == 0
    until = json.loads(result.stdout)[0]["members"][0]["cooling_down_until"]
    assert until <= time.time() + config.MAX_SECONDS + 1
    assert "cooling down until" in run_llm("lb", "stats").stdout


def test_stats_say_1_request(fake_models, run_llm):
    save_lb("x", "flaky name=a", "flaky name=b")
    run_llm("-m", "lb:x", "hi")
    assert "\n     1 request, 1 ok, 0 failed;" in run_llm("lb", "stats", "x").stdout


@pytest.mark.parametrize("value,expected", [("inf", 10), ("nan", 10), ("-5", 10), ("2.5", 2.5)])
def test_the_state_timeout_from_the_environment_is_sane(monkeypatch, value, expected):
    monkeypatch.setenv(state.TIMEOUT_ENV, value)
    assert state.timeout() == expected


# --- folders, files and editors in any state -------------------------------------------------


def test_loadbalancers_being_a_file_gives_one_line_everywhere(user_path):
    (user_path / FOLDER).write_text("not a folder")
    for args in (
        ("lb", "path"),
        ("lb", "save", "x", "echo", "echo"),
        ("lb", "show", "x"),
        ("lb", "remove", "x"),
        ("lb", "edit", "x"),
    ):
        one_line_error(invoke(*args), "is not a folder: move it away")
    assert invoke("lb", "list").stdout == "No load balancers saved\n"
    llm_still_works()


def test_a_folder_that_cannot_be_written_gives_one_line(user_path, monkeypatch):
    save_lb("x", "echo", "echo")
    before = folder_snapshot(user_path)
    # As root the permissions of a folder do not stop writes: the OS's refusal is what
    # tempfile.mkstemp and os.unlink raise for a read-only folder.
    refused = PermissionError(13, "Permission denied", str(user_path / FOLDER / ".x.tmp"))

    def refuse(*args, **kwargs):
        raise refused

    monkeypatch.setattr(config.tempfile, "mkstemp", refuse)
    monkeypatch.setattr("pathlib.Path.unlink", refuse)
    one_line_error(invoke("lb", "save", "y", "echo", "echo"), "Permission denied", "write to")
    one_line_error(invoke("lb", "remove", "x"), "Permission denied")
    assert folder_snapshot(user_path) == before


@pytest.fixture
def editor(tmp_path, monkeypatch):
    """An EDITOR that runs the given Python code on the file it is asked to edit (sys.argv[-1]).
    The edit's temporary files go to the test's own folder."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def use(code):
        script = tmp_path / "editor.py"
        script.write_text(f"import sys\npath = sys.argv[-1]\n{code}\n")
        monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")
        monkeypatch.delenv("VISUAL", raising=False)

    return use


def kept_file(line):
    "The path of the edited text that an error says was kept."
    from pathlib import Path

    return Path(line.rsplit(" is in ", 1)[1].rstrip(")"))


def test_edit_opens_a_file_that_is_not_utf8_and_saves_it_once_valid(user_path, editor):
    path = write_file(user_path, "bin.yaml", b"members: [echo, echo]\n# caf\xe9\n")
    editor("text = open(path).read()\nopen(path, 'w').write(text.replace('\\\\xe9', 'e'))")
    result = invoke("lb", "edit", "bin")
    assert result.exit_code == 0, result.output
    assert "not UTF-8 text: the bytes that are not are shown as \\xNN" in result.stderr
    assert path.read_text() == "members: [echo, echo]\n# cafe\n"


def test_an_edit_that_cannot_be_saved_keeps_the_old_file_and_the_edited_text(user_path, editor):
    save_lb("ed", "echo", "echo")
    before = folder_snapshot(user_path)
    editor("open(path, 'w').write('members: [echo, nope-model]\\n')")
    line = one_line_error(invoke("lb", "edit", "ed"), "lb:ed was not changed", "nope-model")
    assert kept_file(line).read_text() == "members: [echo, nope-model]\n"
    assert folder_snapshot(user_path) == before


def test_an_editor_that_writes_bytes_that_are_not_utf8(user_path, editor):
    save_lb("ed", "echo", "echo")
    before = folder_snapshot(user_path)
    editor("open(path, 'wb').write(b'members: [echo, \\xff]')")
    line = one_line_error(invoke("lb", "edit", "ed"), "the edited text is not UTF-8")
    assert kept_file(line).read_bytes() == b"members: [echo, \xff]"
    assert folder_snapshot(user_path) == before


def test_an_editor_that_deletes_its_file(user_path, editor):
    save_lb("ed", "echo", "echo")
    before = folder_snapshot(user_path)
    editor("import os\nos.unlink(path)")
    one_line_error(invoke("lb", "edit", "ed"), "the editor removed the file it edited")
    assert folder_snapshot(user_path) == before


# --- messages --------------------------------------------------------------------------------


def test_a_typo_in_a_command_is_an_error_with_a_suggestion():
    one_line_error(invoke("lb", "stat"), "no command 'llm lb stat': did you mean 'llm lb stats'?")
    assert invoke("lb").exit_code == 0  # no command at all: list


def test_files_that_are_not_read_are_reported(user_path):
    save_lb("good", "echo", "echo")
    write_file(user_path, "team.yml", "members: [echo, echo]\n")
    write_file(user_path, "my lb.yaml", "members: [echo, echo]\n")
    result = invoke("lb", "list")
    assert result.stdout == "lb:good  roundrobin  echo, echo\n"
    assert result.stderr.splitlines() == [
        "Warning: skipped 'my lb.yaml': not a load balancer name (1-64 letters, digits, '-', "
        "'_' or '.', starting with a letter or digit): rename it",
        "Warning: skipped 'team.yml': balancer files end in .yaml: rename it team.yaml",
    ]


def test_an_option_not_every_member_has(fake_models):
    save_lb("mix", "echo", "plain-sync")
    line = one_line_error(invoke("-m", "lb:mix", "-o", "example_bool", "1", "hi"))
    assert line == (
        "Error: lb:mix: option 'example_bool' is not one that every member has: lb:mix takes "
        "no options ('llm models --options -m lb:mix' describes them)"
    )


def test_a_broken_balancer_advertises_nothing_and_names_its_file(user_path, tmp_path):
    save_lb("inner", "echo", "echo")
    path = write_file(user_path, "broken.yaml", "members: [echo, nope-model]\n")
    listed = invoke("models", "--options").stdout
    block = listed.split("lb:broken")[1].split("LoadBalancer")[0]
    assert f"(broken: {path}: no member is installed" not in block  # one member is installed
    write_file(user_path, "broken.yaml", "members: [echo, 'lb:inner']\n")
    listed = invoke("models", "--options").stdout
    block = listed.split("lb:broken")[1].split("LoadBalancer")[0]
    assert f"(broken: {path}: member 2 (lb:inner)" in block
    assert "streaming" not in block and "tools" not in block and "Attachment" not in block
    image = tmp_path / "x.png"
    image.write_bytes(bytes.fromhex("89504e470d0a1a0a") + b"\0" * 16)
    one_line_error(invoke("-m", "lb:broken", "-a", str(image), "hi"), f"lb:broken: {path}")


def test_a_corrupt_state_file_says_what_to_do(user_path):
    save_lb("x", "echo", "echo")
    (user_path / "loadbalancers.db").write_bytes(b"this is not a database" * 100)
    state._connections.clear()
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0, result.output  # the prompt still runs
    line = one_line_error(invoke("lb", "stats", "x"))
    assert "the file is damaged; move it away" in line


# --- the state file's schema -----------------------------------------------------------------

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
    state._connections.clear()
    plan = state.select(balancer).plan
    assert plan.order[0] == 2  # the rotation went on where it was
    members = state.stats(balancer)
    assert members[0]["requests"] == 5
    assert members[1]["cooling_down_until"] <= time.time() + config.MAX_SECONDS + 1
    assert_upgraded(user_path)


def old_state_file(user_path, version, balancer):
    "A state file with the tables of an older version, and the balancer's rotation on record."
    db = sqlite3.connect(user_path / "loadbalancers.db")
    for step in state.MIGRATIONS[:version]:
        db.executescript(step)
    db.execute(f"pragma user_version = {version}")
    db.execute("insert into rotation values ('x', ?, 0)", [balancer.signature])
    return db


def assert_upgraded(user_path):
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma user_version").fetchone()[0] == state.VERSION


def test_a_state_file_of_version_3_is_upgraded_and_keeps_counting_its_requests_and_tokens(
    user_path,
):
    save_lb("x", "echo rpm=1", "echo tpm=100")
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
    state._connections.clear()
    choice = state.select(balancer, now=now)
    assert choice.plan.order == ()  # both at their limits, as before the upgrade
    assert choice.plan.wait == (pytest.approx(now + 50), 0)
    members = state.stats(balancer, now=now)
    assert [member["limits"] for member in members] == [
        {"rpm": {"used": 1, "limit": 1}},
        {"tpm": {"used": 150, "limit": 100}},
    ]
    # what stats had counted is counted once
    assert (members[0]["requests"], members[0]["input_tokens"]) == (4, 40)
    assert_upgraded(user_path)


def test_a_state_file_of_version_4_is_upgraded_and_keeps_its_counts_outcomes_and_tokens(
    user_path,
):
    save_lb("x", "echo rpm=1", "echo tpm=100")
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
    state._connections.clear()
    choice = state.select(balancer, now=now)
    assert choice.plan.order == ()  # both at their limits, as before the upgrade
    # member 2 frees up first: a minute after its last tokens were reported
    assert choice.plan.wait == (pytest.approx(now + 40.5, abs=0.01), 1)
    members = state.stats(balancer, now=now)
    assert [member["limits"] for member in members] == [
        {"rpm": {"used": 1, "limit": 1}},
        {"tpm": {"used": 180, "limit": 100}},
    ]
    with state.transaction(state.file_of(balancer)) as db:  # what choices count: 30 + 150
        assert state._FileKnown(db, balancer, now, []).totals(1) == {60.0: (0, 180)}
    # each outcome counted once, with its tokens and when it ended
    assert [(m["requests"], m["input_tokens"], m["output_tokens"]) for m in members] == [
        (5, 43, 65),
        (1, 100, 50),
    ]
    assert members[1]["last_used"] == pytest.approx(now - 19.5)
    # and the tokens reported from now on are added to the running total
    state.record(balancer, 1, tokens=(7, 3), now=now + 1)
    assert state.stats(balancer, now=now + 1)[1]["limits"]["tpm"]["used"] == 190
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

    monkeypatch.setattr(state, "_pause", pause)
    state._connections.clear()
    assert state.select(config.load("x")).plan.order[0] == 0
    assert len(pauses) == 1
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_a_state_file_from_a_newer_version_is_not_touched(user_path, monkeypatch):
    from llm_loadbalancer import delegate

    monkeypatch.setattr(delegate, "_warned", False)  # the warning is once per process
    save_lb("x", "echo", "echo")
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        db.execute(f"pragma user_version = {state.VERSION + 1}")
    state._connections.clear()
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0
    assert "from a newer llm-loadbalancer" in result.stderr
    with sqlite3.connect(user_path / "loadbalancers.db") as db:
        assert db.execute("pragma user_version").fetchone()[0] == state.VERSION + 1


# --- found in review: values PyYAML or a model cannot build, FIFOs ---------------------------


@pytest.mark.parametrize(
    "content,message",
    [
        ("members: [echo, echo]\ncooldown: 2001-13-45\n", "a value cannot be read"),
        ("members: [echo, echo]\ncooldown: " + "9" * 5000 + "\n", "a value cannot be read"),
    ],
)
def test_a_value_that_cannot_be_built_is_one_line_and_llm_keeps_working(
    user_path, content, message
):
    write_file(user_path, "odd.yaml", content)
    listed = llm_still_works()
    assert f"lb:odd (broken: {user_path / FOLDER / 'odd.yaml'}: {message}" in listed
    one_line_error(invoke("lb", "show", "odd"), message)
    one_line_error(invoke("-m", "lb:odd", "hi"), message)


def test_an_option_a_model_refuses_with_its_own_error(fake_models, user_path, monkeypatch):
    # the model's Options class raises something other than pydantic's error
    from fake_models import PlainSync

    def refuse(cls, value):
        raise AttributeError("'str' object has no attribute 'items'")

    import pydantic

    class Odd(PlainSync.Options):
        @pydantic.field_validator("temperature", mode="before")
        @classmethod
        def odd(cls, value):
            return refuse(cls, value)

    monkeypatch.setattr(PlainSync, "Options", Odd)
    one_line_error(
        invoke("lb", "save", "x", "plain-sync temperature=1", "echo"), "its options are refused"
    )
    write_file(user_path, "x.yaml", "members: [{model: plain-sync, options: {temperature: 1}}]")
    assert "lb:x (broken: " in llm_still_works()


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs here")
def test_a_fifo_in_the_folder_is_skipped_not_read(user_path):
    import os

    save_lb("good", "echo", "echo")
    os.mkfifo(user_path / FOLDER / "pipe.yaml")
    listed = llm_still_works()  # would hang reading the FIFO
    assert "lb:pipe" not in listed
    result = invoke("lb", "list")
    assert result.stdout == "lb:good  roundrobin  echo, echo\n"
    assert "Warning: skipped 'pipe.yaml': not a regular file" in result.stderr
    one_line_error(invoke("lb", "show", "pipe"), "not a regular file")


def test_a_reader_that_stops_early_gets_no_error_message(user_path):
    "llm lb list | head -1: the pipe closes before the output is written; nothing is said."
    save_lb("x", "echo", "echo")
    read, write = os.pipe()
    os.close(read)  # a reader that is already gone: every write breaks the pipe
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "llm", "lb", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=process_env(),
            timeout=60,
        )
    finally:
        os.close(write)
    assert proc.stderr == ""
