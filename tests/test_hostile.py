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
from conftest import folder_snapshot, invoke, process_env, save_lb, use_editor

from llm_loadbalancer import config, store

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
def test_an_absurd_retry_after_never_keeps_a_member_out_past_a_week(
    fake_models, run_llm, retry_after
):
    save_lb("x", f"flaky name=a fail=429:{retry_after}", "flaky name=b", flags=("--cooldown", "7"))
    before = time.time()
    answer = run_llm("-m", "lb:x", "hi")
    assert answer.stdout.strip() == "answer from b"
    result = run_llm("lb", "stats", "x", "--json")
    assert result.exit_code == 0
    until = json.loads(result.stdout)[0]["members"][0]["cooling_down_until"]  # valid JSON
    # not a number, or negative: the balancer's cooldown; absurdly long: a week at most
    expected = config.MAX_STATED_SECONDS if retry_after == "1e300" else 7
    assert before + expected - 1 <= until <= time.time() + expected + 1
    assert run_llm("lb", "stats").exit_code == 0


@pytest.mark.parametrize("known", [0, 1])
def test_a_cooldown_stored_by_an_older_version_is_capped_and_stats_never_crash(
    fake_models, run_llm, known
):
    save_lb("x", "flaky name=a", "flaky name=b")
    run_llm("-m", "lb:x", "hi")
    with sqlite3.connect(store.file_of()) as db:  # what 0.1.0 stored for Retry-After: inf
        db.execute(
            "insert into cooldowns (balancer, member, until, reason, known) "
            "select balancer, 0, ?, 'inf', ? from rotation where balancer like 'x:%'",
            [math.inf, known],
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
    monkeypatch.setenv(store.TIMEOUT_ENV, value)
    assert store.timeout() == expected


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
    monkeypatch.setattr("os.unlink", refuse)
    one_line_error(invoke("lb", "save", "y", "echo", "echo"), "Permission denied", "write to")
    one_line_error(invoke("lb", "remove", "x"), "Permission denied")
    assert folder_snapshot(user_path) == before


@pytest.fixture
def editor(tmp_path, monkeypatch):
    """An EDITOR that runs the given Python code on the file it is asked to edit (sys.argv[-1],
    ``path``), with ``use_editor``."""

    def use(code):
        script = tmp_path / "editor.py"
        script.write_text(f"import sys\npath = sys.argv[-1]\n{code}\n")
        use_editor(monkeypatch, tmp_path, script)

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
    store.new_process()
    result = invoke("-m", "lb:x", "hi")
    assert result.exit_code == 0, result.output  # the prompt still runs
    line = one_line_error(invoke("lb", "stats", "x"))
    assert "the file is damaged; move it away" in line


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
