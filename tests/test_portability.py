"""What must hold on Windows and macOS as on Linux: files written byte for byte as UTF-8, output
that a code page can carry, names that can be files, Windows paths in member settings, and a
wait for a member that still sees Ctrl-C. (This suite runs on Linux: where Windows behaves
otherwise, the test puts the machine in Windows' place as far as Python lets it.)"""

import errno
import io
import json
import os
import queue
import sys

import click
import pytest
from conftest import invoke, llm_process, save_lb, use_editor
from test_commands import editor  # noqa: F401 (the fixture)

from llm_loadbalancer import config, drive


def windows_text_mode(monkeypatch):
    """Files opened in text mode as on Windows: each "\\n" written as "\\r\\n" unless the
    caller says otherwise (newline=), in the code page unless it names an encoding."""
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        if "b" not in mode:
            kwargs.setdefault("encoding", "cp1252")
            if kwargs.get("newline") is None:
                kwargs["newline"] = "\r\n"
        return real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_an_edit_is_saved_byte_for_byte_as_utf8_and_an_unchanged_one_is_no_change(
    user_path,
    fake_models,
    editor,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    save_lb("ed", "echo", "echo")
    windows_text_mode(monkeypatch)
    edited = (  # (sync-stream's option "wait" is text: a block of two lines here)
        "# résumé 文字 ✓\nmembers:\n  - model: sync-stream\n    options:\n      wait: |\n"
        "        line one\n        line two\n  - model: echo\n"
    )
    editor(edited)
    result = invoke("lb", "edit", "ed")
    assert result.exit_code == 0, result.output
    path = user_path / "loadbalancers" / "ed.yaml"
    assert path.read_bytes() == edited.encode("utf-8")  # no "\r" added, not a code page
    assert config.load("ed").members[0].options["wait"] == "line one\nline two\n"
    # an editor closed without a change: the text it was given is the file's, byte for byte
    (tmp_path / "unchanged.py").write_text("")
    use_editor(monkeypatch, tmp_path, tmp_path / "unchanged.py")
    result = invoke("lb", "edit", "ed")
    assert (result.exit_code, result.stderr) == (0, "No changes to lb:ed\n")
    assert path.read_bytes() == edited.encode("utf-8")


def test_stats_written_to_a_file_in_a_code_page_without_the_bar_use_plain_marks(user_path):
    save_lb("x", "echo", "echo")
    assert invoke("-m", "lb:x", "hi").exit_code == 0
    # (on Windows, output to a file or a pipe is in the system's code page: cp1252 here)
    result = llm_process("lb", "stats", "x", env={"PYTHONIOENCODING": "cp1252"})
    assert result.returncode == 0, result.stderr
    assert "  1. echo  ####################" + " 100% of traffic" in result.stdout
    assert "  2. echo  ...................." + " 0% of traffic" in result.stdout
    # where the output carries it, the bar is as before
    assert "  1. echo  " + "█" * 20 + " 100% of traffic" in invoke("lb", "stats", "x").stdout


@pytest.mark.parametrize("windows", [True, False])
def test_a_file_another_process_holds_is_replaced_once_it_lets_go_on_windows(windows, monkeypatch):
    """On Windows a balancer file that another process has open (an llm reading it, a virus
    scanner) cannot be replaced or removed for that moment: the change is tried again."""
    monkeypatch.setattr(config, "WINDOWS", windows)
    pauses, tries = [], []

    def held_twice(path):
        tries.append(path)
        if len(tries) <= 2:
            raise PermissionError(13, "The process cannot access the file", path)
        return "done"

    if windows:
        assert config.retry_while_in_use(held_twice, "a.yaml", pause=pauses.append) == "done"
        assert (len(tries), pauses) == (3, [0.01, 0.02])
    else:  # elsewhere a refusal is the folder's permissions: said at once
        with pytest.raises(PermissionError):
            config.retry_while_in_use(held_twice, "a.yaml", pause=pauses.append)
        assert (len(tries), pauses) == (1, [])
    tries.clear()

    def held(path):
        tries.append(path)
        raise PermissionError(13, "Access is denied", path)

    with pytest.raises(PermissionError):  # held for good: said after about 1.3 s
        config.retry_while_in_use(held, "a.yaml", pause=pauses.append)
    assert len(tries) == (8 if windows else 1)


def test_on_windows_save_and_remove_go_through_once_the_file_is_let_go(user_path, monkeypatch):
    "lb save (its os.replace) and lb remove (its os.unlink) while another process holds the file."
    monkeypatch.setattr(config, "WINDOWS", True)
    refused = []

    def held_twice(name, real):
        def operation(*paths):
            if str(paths[-1]).endswith("x.yaml") and len(refused) % 3 < 2:
                refused.append(name)
                raise PermissionError(13, "The process cannot access the file", str(paths[-1]))
            refused.append("done")
            return real(*paths)

        return operation

    monkeypatch.setattr(os, "replace", held_twice("replace", os.replace))
    monkeypatch.setattr(os, "unlink", held_twice("unlink", os.unlink))
    assert invoke("lb", "save", "x", "echo", "echo").exit_code == 0
    assert refused == ["replace", "replace", "done"]
    assert invoke("lb", "remove", "x").exit_code == 0
    assert refused[3:] == ["unlink", "unlink", "done"]
    assert not (user_path / "loadbalancers" / "x.yaml").exists()


@pytest.mark.parametrize("name", ["aux", "NUL", "con.fast", "com0", "lpt9"])
def test_a_name_windows_keeps_for_a_device_is_refused_there_and_kept_elsewhere(
    name, user_path, monkeypatch
):
    monkeypatch.setattr(config, "WINDOWS", True)
    result = invoke("lb", "save", name, "echo", "echo")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: invalid load balancer name '{name}': Windows keeps it for a device (CON, PRN, "
        "AUX, NUL, COM0-COM9, LPT0-LPT9), so it cannot name a file: choose another\n"
    )
    assert not (user_path / "loadbalancers" / f"{name}.yaml").exists()
    if os.name != "nt":  # elsewhere a file like any other: one saved before stays usable
        monkeypatch.setattr(config, "WINDOWS", False)
        assert invoke("lb", "save", name, "echo", "echo").exit_code == 0
        assert (user_path / "loadbalancers" / f"{name}.yaml").exists()


@pytest.mark.parametrize("name", ["console", "com10", "auxiliary", "aux1", "nullable", "lpt"])
def test_a_name_that_only_starts_like_a_device_is_a_name_on_windows(name, user_path, monkeypatch):
    monkeypatch.setattr(config, "WINDOWS", True)
    assert invoke("lb", "save", name, "echo", "echo").exit_code == 0


def test_a_backslash_in_a_member_setting_is_kept_and_quotes_still_group_words(fake_models):
    # (sync-stream's option "wait" takes any text)
    save_lb("w", r"sync-stream wait=C:\Models\x.gguf weight=2", "sync-stream wait='be brief'")
    result = invoke("lb", "show", "w", "--json")
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)["members"]
    assert (first["options"], first["weight"]) == ({"wait": r"C:\Models\x.gguf"}, 2)
    assert second["options"] == {"wait": "be brief"}
    result = invoke("lb", "save", "bad", "sync-stream wait='unclosed", "echo")
    assert result.exit_code == 1
    assert result.stderr == 'Error: member "sync-stream wait=\'unclosed": No closing quotation\n'


@pytest.mark.parametrize(
    "spec,words",
    [
        ("m key=work", ["m", "key=work"]),
        ("m  system='be brief'  key=k", ["m", "system=be brief", "key=k"]),
        ('m system="it\'s"', ["m", "system=it's"]),
        ("m x='' y", ["m", "x=", "y"]),
        ("m a#b", ["m", "a#b"]),  # (no comments)
        # a backslash before a quote or a space escapes it, as in a shell
        (r'm system="say \"hi\""', ["m", 'system=say "hi"']),
        (r"m s=don\'t", ["m", "s=don't"]),
        (r"m s=be\ brief", ["m", "s=be brief"]),
        # any other is kept as written: a Windows path, a share, between quotes too
        (r"m path=C:\Users\me\x.gguf", ["m", r"path=C:\Users\me\x.gguf"]),
        (r"m path=\\server\share", ["m", r"path=\\server\share"]),
        ("m a='C:\\x' b=\"C:\\y\"", ["m", r"a=C:\x", r"b=C:\y"]),
    ],
)
def test_a_members_words_are_split_as_a_shell_splits_them_but_for_backslashes(spec, words):
    assert config.split_words(spec) == words


@pytest.mark.parametrize("wait", ["before", "after"])
def test_a_wait_for_a_members_chunk_goes_on_across_slices_until_the_timeout(
    fake_models, monkeypatch, wait
):
    """The wait for a member's next chunk is cut into slices (so that Ctrl-C is seen on Windows
    between them): a member that answers after several slices, within the timeout, answers."""
    from fake_models import GATE

    waits = []  # the timeout of each wait for the member's next item

    class Watched(queue.SimpleQueue):
        def get(self, block=True, timeout=None):
            waits.append(timeout)
            try:
                return super().get(block, timeout)
            except queue.Empty:
                if len(waits) >= 5:  # the member goes on after five slices
                    GATE.set()
                raise

    monkeypatch.setattr(queue, "SimpleQueue", Watched)
    monkeypatch.setattr(drive, "SLICE", 0.001)
    save_lb("s", f"sync-stream wait={wait}", "echo", flags=("--timeout", "60"))
    try:
        result = invoke("-m", "lb:s", "hi")
    finally:
        GATE.set()
    assert (result.exit_code, result.stdout) == (0, "one two\n"), result.output
    assert len(waits) >= 5 and all(timeout is not None and timeout <= 0.001 for timeout in waits)


@pytest.mark.parametrize("windows", [True, False])
def test_a_file_that_could_not_be_read_for_a_moment_is_read_again(windows, user_path, monkeypatch):
    """On Windows a file that another process is replacing cannot be opened for that moment:
    it is tried again at once; elsewhere such a refusal is the file's permissions, and the next
    model look-up of the same process (llm chat, a Python program) reads it again, though it
    has not changed since."""
    save_lb("x", "echo", "echo")
    monkeypatch.setattr(config, "WINDOWS", windows)
    real_open, refused = os.open, []

    def open_busy_once(path, flags, *args, **kwargs):
        if str(path).endswith("x.yaml") and not refused:
            refused.append(path)
            raise PermissionError(13, "The process cannot access the file", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_busy_once)
    result = invoke("-m", "lb:x", "hi")
    if not windows:
        assert result.exit_code == 1
        assert "x.yaml: cannot be read: The process cannot access the file" in result.stderr
        result = invoke("-m", "lb:x", "hi")
    assert (result.exit_code, json.loads(result.stdout)["prompt"]) == (0, "hi")
    assert len(refused) == 1


@pytest.mark.parametrize("windows", [True, False])
def test_on_windows_a_reader_that_stops_early_gets_no_error_message(
    windows, user_path, monkeypatch
):
    """llm lb list | (a reader that stops at once): Windows says so with EINVAL, not with a
    broken pipe, on the write; nothing is said there either. Elsewhere EINVAL is an error."""
    save_lb("x", "echo", "echo")
    monkeypatch.setattr(config, "WINDOWS", windows)

    class Gone(io.StringIO):  # what is left of the output cannot be flushed either
        def flush(self):
            raise OSError(errno.EINVAL, "Invalid argument")

    def reader_gone(*args, **kwargs):
        if windows:  # (the runner gives the output back afterwards)
            sys.stdout = Gone()
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(click, "echo", reader_gone)
    result = invoke("lb", "list")
    assert result.exit_code == 1
    if windows:
        assert result.stderr == ""
    else:
        assert result.stderr.startswith("Error: Invalid argument")


def test_on_windows_einval_from_anything_but_the_output_is_still_an_error(user_path, monkeypatch):
    "An EINVAL of the file system (here saving's fsync), the output fine: said in one line."
    monkeypatch.setattr(config, "WINDOWS", True)

    def refused(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(config.os, "fsync", refused)
    result = invoke("lb", "save", "x", "echo", "echo")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: Invalid argument: check that "
        f"{user_path / 'loadbalancers'} is a folder you can write to\n",
    )
    assert not (user_path / "loadbalancers" / "x.yaml").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd (Linux)")
def test_save_reset_and_remove_keep_no_state_file_open_once_done(user_path):
    """The commands that change the state (save, reset, remove) leave no state file open once
    each is done: on Windows an open file cannot be removed or moved away."""

    def open_state_files():
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            found += [target] if target.startswith(str(user_path / "loadbalancers.db")) else []
        return found

    for command in (
        ("lb", "save", "x", "echo rpm=5", "echo"),  # (its limit declared in the file)
        ("lb", "save", "x", "echo rpm=6", "echo", "--force"),  # (the old definition retired)
        ("lb", "reset", "x"),
        ("lb", "remove", "x"),
    ):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        assert (user_path / "loadbalancers.db").exists()
        assert open_state_files() == [], command


def test_a_name_that_differs_only_in_case_is_the_saved_balancer(user_path):
    """On macOS and Windows fast.yaml and FAST.yaml are one file: a command given FAST for the
    saved lb:fast acts on lb:fast (and on the state kept under its name), and saving FAST
    beside it is refused, on every system alike."""
    save_lb("fast", "echo", "echo example_bool=true")
    result = invoke("lb", "save", "FAST", "echo", "echo", "--force")
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: lb:fast is saved, and on macOS and Windows lb:FAST would be the same file: use "
        "the name fast (llm lb save fast ... --force replaces it) or another\n",
    )
    assert sorted(p.name for p in (user_path / "loadbalancers").iterdir()) == ["fast.yaml"]
    assert invoke("lb", "show", "Fast").stdout == invoke("lb", "show", "fast").stdout
    assert [answered_by(invoke("-m", "lb:fast", "hi")) for _ in range(3)] == [1, 2, 1]
    assert invoke("lb", "remove", "FAST").exit_code == 0  # its rotation forgotten with it
    assert not (user_path / "loadbalancers" / "fast.yaml").exists()
    save_lb("fast", "echo", "echo example_bool=true")
    assert answered_by(invoke("-m", "lb:fast", "hi")) == 1


def answered_by(result) -> int:
    "Which member answered (each balancer here: echo twice, the second with example_bool)."
    assert result.exit_code == 0, result.output
    return 2 if "example_bool" in result.stdout else 1
