"""`llm lb ...`: defining balancers, and refusing broken ones (issue 2)."""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import folder_snapshot, llm_process, set_keys, use_editor


def lb_file(user_path, name):
    return user_path / "loadbalancers" / f"{name}.yaml"


def assert_clean_error(result, *fragments):
    "One line 'Error: ...', exit 1, no traceback."
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_plugin_is_listed(run_llm):
    result = run_llm("plugins")
    names = [p["name"] for p in json.loads(result.stdout)]
    assert "llm-loadbalancer" in names


def test_list_with_nothing_saved(run_llm):
    result = run_llm("lb", "list")
    assert result.exit_code == 0
    assert result.stdout == "No load balancers saved\n"
    # `llm lb` alone lists too
    assert run_llm("lb").stdout == "No load balancers saved\n"


def test_save_list_show(run_llm, user_path):
    set_keys(user_path, work="sk-work-secret", personal="sk-personal-secret")
    result = run_llm(
        "lb",
        "save",
        "fast",
        "echo key=work",
        "echo key=personal example_bool=true",
        "echo-needs-key",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == "Saved load balancer lb:fast with 3 members\n"

    listed = run_llm("lb", "list").stdout
    assert listed == (
        "lb:fast  roundrobin  echo (key: work), echo (key: personal, example_bool=true), "
        "echo-needs-key\n"
    )
    data = yaml.safe_load(run_llm("lb", "show", "fast").stdout)
    assert data == {
        "policy": "roundrobin",
        "members": [
            {"model": "echo", "key": "work"},
            {"model": "echo", "key": "personal", "options": {"example_bool": True}},
            {"model": "echo-needs-key"},
        ],
    }
    shown = json.loads(run_llm("lb", "show", "fast", "--json").stdout)
    assert shown["model_id"] == "lb:fast"
    assert shown["members"] == data["members"]
    as_json = json.loads(run_llm("lb", "list", "--json").stdout)
    assert [row["model_id"] for row in as_json] == ["lb:fast"]
    # The file on disk is the same YAML, and holds key names, never values
    text = lb_file(user_path, "fast").read_text()
    assert yaml.safe_load(text) == data
    assert "secret" not in text


def test_values_are_read_like_yaml_scalars(run_llm, user_path):
    result = run_llm("lb", "save", "typed", "echo example_bool=true", "echo example_bool=false")
    assert result.exit_code == 0, result.output
    members = yaml.safe_load(lb_file(user_path, "typed").read_text())["members"]
    assert members[0]["options"] == {"example_bool": True}
    assert members[1]["options"] == {"example_bool": False}


def test_existing_balancer_replaced_only_with_force(run_llm, user_path):
    assert run_llm("lb", "save", "x", "echo", "echo").exit_code == 0
    before = folder_snapshot(user_path)
    result = run_llm("lb", "save", "x", "echo", "echo", "echo")
    assert_clean_error(result, "lb:x already exists", "--force")
    assert folder_snapshot(user_path) == before
    result = run_llm("lb", "save", "x", "echo", "echo", "echo", "--force")
    assert result.stderr == "Saved load balancer lb:x with 3 members\n"
    assert len(yaml.safe_load(lb_file(user_path, "x").read_text())["members"]) == 3


def test_save_from_yaml_file(run_llm, user_path, tmp_path):
    source = tmp_path / "team.yaml"
    source.write_text(
        textwrap.dedent(
            """
            policy: failover
            sticky: true
            members:
              - model: echo
                options:
                  example_bool: true
              - model: echo-needs-key
            """
        )
    )
    result = run_llm("lb", "save", "team", "--file", str(source))
    assert result.stderr == "Saved load balancer lb:team with 2 members\n"
    saved = yaml.safe_load(lb_file(user_path, "team").read_text())
    assert saved["policy"] == "failover"
    assert saved["sticky"] is True


def test_save_from_json_on_stdin(run_llm, user_path):
    body = json.dumps({"policy": "roundrobin", "members": [{"model": "echo"}, {"model": "echo"}]})
    result = run_llm("lb", "save", "fromjson", "--file", "-", input=body)
    assert result.stderr == "Saved load balancer lb:fromjson with 2 members\n"
    assert run_llm("lb", "list").stdout == "lb:fromjson  roundrobin  echo, echo\n"


def test_save_flags_are_stored(run_llm, user_path):
    result = run_llm(
        "lb",
        "save",
        "flags",
        "echo",
        "echo",
        "--policy",
        "failover",
        "--sticky",
        "--no-failover",
        "--cooldown",
        "5",
    )
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load(lb_file(user_path, "flags").read_text())
    assert saved["policy"] == "failover"
    assert saved["sticky"] is True
    assert saved["failover"] is False
    assert saved["cooldown"] == 5


def test_save_without_members_needs_a_terminal(run_llm, user_path):
    result = run_llm("lb", "save", "pick")
    assert_clean_error(result, "no members given", "terminal")
    assert folder_snapshot(user_path) == {}


def test_save_without_members_on_a_terminal_asks(run_llm, user_path, monkeypatch):
    import llm_loadbalancer.commands as commands

    monkeypatch.setattr(commands, "_stdin_is_terminal", lambda: True)
    assert run_llm("lb", "save", "other", "echo", "echo").exit_code == 0
    shown = run_llm("lb", "save", "pick", input="9999\n")
    assert shown.exit_code == 1
    assert shown.stderr.splitlines()[-1].startswith("Error: '9999' is not a number from 1 to")
    listing = shown.stderr
    # Installed models are listed, numbered, without lb: models
    assert "lb:other" not in listing
    numbers = {
        line.split(". ", 1)[1]: line.split(".")[0].strip()
        for line in listing.splitlines()
        if ". " in line and line.split(".")[0].strip().isdigit()
    }
    assert "echo" in numbers and "echo-needs-key" in numbers
    answer = f"{numbers['echo']}, {numbers['echo-needs-key']}\n"
    result = run_llm("lb", "save", "pick", input=answer)
    assert result.exit_code == 0, result.output
    assert result.stderr.endswith("\nSaved load balancer lb:pick with 2 members\n")
    members = yaml.safe_load(lb_file(user_path, "pick").read_text())["members"]
    assert members == [{"model": "echo"}, {"model": "echo-needs-key"}]


def test_remove(run_llm, user_path):
    run_llm("lb", "save", "gone", "echo", "echo")
    result = run_llm("lb", "remove", "gone")
    assert result.exit_code == 0
    assert not lb_file(user_path, "gone").exists()
    assert run_llm("lb", "list").stdout == "No load balancers saved\n"
    assert_clean_error(run_llm("lb", "remove", "gone"), "no load balancer named 'gone'")


def test_path(run_llm, user_path):
    assert run_llm("lb", "path").stdout.strip() == str(user_path / "loadbalancers")


@pytest.fixture
def editor(tmp_path, monkeypatch):
    "An EDITOR that replaces the file with the text the test gives it (``use_editor``)."

    def use(text):
        replacement = tmp_path / "replacement.yaml"
        replacement.write_bytes(text.encode("utf-8"))
        script = tmp_path / "editor.py"
        script.write_text(
            f"import shutil, sys\nshutil.copyfile({str(replacement)!r}, sys.argv[-1])\n"
        )
        use_editor(monkeypatch, tmp_path, script)

    return use


def test_edit_opens_a_broken_file_so_it_can_be_fixed(run_llm, user_path, editor):
    folder = user_path / "loadbalancers"
    folder.mkdir()
    (folder / "typo.yaml").write_text("memebers: [echo, echo]\n")
    editor("members: [echo, echo]\n")
    result = run_llm("lb", "edit", "typo")
    assert result.exit_code == 0, result.output
    assert run_llm("lb", "list").stdout == "lb:typo  roundrobin  echo, echo\n"
    assert_clean_error(run_llm("lb", "edit", "nothing"), "no load balancer named 'nothing'")


def test_edit_saves_a_valid_edit(run_llm, user_path, editor):
    run_llm("lb", "save", "ed", "echo", "echo")
    editor("# my comment\npolicy: failover\nmembers:\n  - model: echo\n  - model: echo-needs-key\n")
    result = run_llm("lb", "edit", "ed")
    assert result.exit_code == 0, result.output
    text = lb_file(user_path, "ed").read_text()
    assert text.startswith("# my comment")
    assert run_llm("lb", "list").stdout == "lb:ed  failover  echo, echo-needs-key\n"


@pytest.mark.parametrize(
    "edited,message",
    [
        ("policy: roundrobin\nmembers: [\n", "not valid YAML"),
        ("policy: roundrobin\nmemebers:\n  - model: echo\n", "unknown field 'memebers'"),
        ("members:\n  - model: nope-model\n", "unknown model 'nope-model'"),
    ],
)
def test_edit_refuses_an_invalid_edit(run_llm, user_path, editor, edited, message):
    run_llm("lb", "save", "ed", "echo", "echo")
    before = folder_snapshot(user_path)
    editor(edited)
    result = run_llm("lb", "edit", "ed")
    assert_clean_error(result, "lb:ed was not changed", message)
    assert folder_snapshot(user_path) == before


# --- validation: each rule, with the kind of input it names ---------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "", "lb:x", "has space", ".hidden", "x" * 65])
def test_bad_names_are_refused(run_llm, user_path, name):
    result = run_llm("lb", "save", name, "echo", "echo")
    assert_clean_error(result, "invalid load balancer name" if name else "name is empty")
    assert folder_snapshot(user_path) == {}
    assert not (user_path / "x.yaml").exists()
    assert not (user_path.parent / "x.yaml").exists()


def test_one_member_is_not_enough_for_save(run_llm, user_path):
    assert_clean_error(
        run_llm("lb", "save", "solo", "echo"), "a load balancer needs at least 2 members"
    )
    assert folder_snapshot(user_path) == {}


def test_a_file_needs_members_and_save_needs_two(run_llm, user_path):
    result = run_llm("lb", "save", "empty", "--file", "-", input="members: []\n")
    assert_clean_error(result, "'members' must be a list with at least one member")
    result = run_llm("lb", "save", "one", "--file", "-", input="members: [echo]\n")
    assert_clean_error(result, "a load balancer needs at least 2 members")
    assert folder_snapshot(user_path) == {}
    # ... but a stored file with one member (written by hand) is still a valid balancer
    (user_path / "loadbalancers").mkdir()
    (user_path / "loadbalancers" / "one.yaml").write_text("members: [echo]\n")
    assert run_llm("lb", "list").stdout == "lb:one  roundrobin  echo\n"


def test_unknown_model_is_named_with_close_matches(run_llm, user_path):
    result = run_llm("lb", "save", "typo", "echo", "echo-need-key")
    assert_clean_error(
        result, "member 2 (echo-need-key)", "unknown model 'echo-need-key'", "echo-needs-key"
    )
    assert folder_snapshot(user_path) == {}


def test_members_may_be_aliases(run_llm, user_path):
    run_llm("aliases", "set", "parrot", "echo")
    result = run_llm("lb", "save", "aliased", "parrot", "echo")
    assert result.exit_code == 0, result.output


def test_nesting_is_refused(run_llm, user_path):
    run_llm("lb", "save", "inner", "echo", "echo")
    before = folder_snapshot(user_path)
    result = run_llm("lb", "save", "outer", "lb:inner", "echo")
    assert_clean_error(result, "load balancers cannot contain other load balancers")
    # ... also through an alias of a balancer
    run_llm("aliases", "set", "sneaky", "lb:inner")
    result = run_llm("lb", "save", "outer", "echo", "sneaky")
    assert_clean_error(
        result, "member 2 (sneaky)", "load balancers cannot contain other load balancers"
    )
    assert folder_snapshot(user_path) == before


def test_bad_member_option_is_named(run_llm, user_path):
    result = run_llm("lb", "save", "opts", "echo", "echo example_bool=maybe")
    assert_clean_error(result, "member 2 (echo, example_bool=maybe)", "option 'example_bool'")
    result = run_llm("lb", "save", "opts", "echo temprature=0.2", "echo")
    assert_clean_error(
        result, "member 1 (echo, temprature=0.2): unknown option 'temprature'", "are example_bool"
    )
    assert folder_snapshot(user_path) == {}


def test_key_must_be_a_stored_key_name_and_is_never_echoed(run_llm, user_path):
    set_keys(user_path, work="sk-work-secret")
    result = run_llm("lb", "save", "k", "echo key=sk-live-PASTED-SECRET", "echo key=work")
    assert_clean_error(result, "member 1", "not the name of a stored key", "llm keys set")
    assert "PASTED-SECRET" not in result.output
    assert folder_snapshot(user_path) == {}


def test_unknown_policy_lists_the_known_ones(run_llm, user_path):
    result = run_llm("lb", "save", "p", "echo", "echo", "--policy", "fastest")
    assert_clean_error(result, "unknown policy 'fastest'", "roundrobin", "least-busy")
    result = run_llm("lb", "save", "p", "--file", "-", input="policy: fastest\nmembers: [echo]\n")
    assert_clean_error(result, "unknown policy 'fastest'")
    assert folder_snapshot(user_path) == {}


@pytest.mark.parametrize(
    "body,message",
    [
        ("memebers:\n  - model: echo\n", "unknown field 'memebers'"),
        ("members:\n  - model: echo\n    modle: echo\n", "member 1: unknown field 'modle'"),
        (
            "members:\n  - model: echo\n    option:\n      example_bool: true\n",
            "unknown field 'option'",
        ),
        ("members:\n  - key: work\n", "member 1 needs 'model'"),
        ("- echo\n- echo\n", "a load balancer definition is a mapping"),
        ("members: [echo]\nsticky: maybe\n", "sticky must be true or false"),
        ("members: [echo]\ncooldown: -1\n", "cooldown must be a number of seconds"),
        ("members: [echo, [1, 2]\n", "not valid YAML"),
    ],
)
def test_bad_files_are_refused(run_llm, user_path, body, message):
    result = run_llm("lb", "save", "f", "--file", "-", input=body)
    assert_clean_error(result, message)
    assert folder_snapshot(user_path) == {}


def test_file_that_is_not_utf8_is_refused(run_llm, user_path, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00members")
    assert_clean_error(run_llm("lb", "save", "b", "--file", str(binary)), "is not UTF-8 text")
    result = run_llm("lb", "save", "b", "--file", "-", input=b"\xff\xfe members")
    assert_clean_error(result, "standard input is not UTF-8 text")
    assert folder_snapshot(user_path) == {}


@pytest.mark.parametrize(
    "member",
    [
        "echo-needs-key key=sk-proj-PASTED123 temperature",
        "echo-needs-key key=sk-proj-PASTED123 'unclosed",
        "key=sk-proj-PASTED123 echo",
    ],
)
def test_member_errors_never_repeat_a_key(run_llm, user_path, member):
    result = run_llm("lb", "save", "x", member, "echo")
    assert_clean_error(result, "key=...")
    assert "PASTED123" not in result.output
    assert folder_snapshot(user_path) == {}


def test_empty_key_is_refused(run_llm, user_path):
    assert_clean_error(run_llm("lb", "save", "x", "echo key=", "echo"), "key= needs the name")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_cooldown_must_be_a_finite_number(run_llm, user_path, value):
    result = run_llm("lb", "save", "c", "echo", "echo", "--cooldown", value)
    assert_clean_error(result, "cooldown must be a number of seconds")
    assert folder_snapshot(user_path) == {}


def test_members_and_file_together_are_refused(run_llm, user_path):
    result = run_llm("lb", "save", "both", "echo", "--file", "-", input="members: [echo]\n")
    assert_clean_error(result, "not both")


# --- broken files never break llm ------------------------------------------------------


def test_broken_files_are_reported_and_llm_keeps_working(run_llm, user_path):
    run_llm("lb", "save", "good", "echo", "echo")
    folder = user_path / "loadbalancers"
    (folder / "garbled.yaml").write_text("members: [echo\n")
    (folder / "typo.yaml").write_text("memebers: [echo]\n")
    (folder / "missing.yaml").write_text("members: [echo, not-installed-model]\n")
    (folder / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")

    listed = run_llm("lb", "list")
    assert listed.exit_code == 0
    lines = dict(line.split(None, 1) for line in listed.stdout.splitlines())
    assert lines["lb:good"] == "roundrobin  echo, echo"
    assert lines["lb:garbled"].startswith(f"error: {folder / 'garbled.yaml'}: not valid YAML")
    assert "unknown field 'memebers'" in lines["lb:typo"]
    assert lines["lb:binary"].startswith(f"error: {folder / 'binary.yaml'}: cannot be read")
    # a member that is not installed is skipped, not fatal: the balancer is listed, warned about
    assert lines["lb:missing"] == "roundrobin  echo, not-installed-model"
    assert lines["warning:"].startswith(
        "member 2 (not-installed-model): unknown model 'not-installed-model'"
    )
    assert lines["warning:"].endswith(": skipped until it is installed")

    shown = run_llm("lb", "show", "typo")
    assert_clean_error(shown, str(folder / "typo.yaml"), "unknown field 'memebers'")

    # llm itself is unaffected, as a new process would see it
    models = llm_process("models")
    assert models.returncode == 0, models.stderr
    assert "lb:good" in models.stdout and "echo" in models.stdout
    assert llm_process("--help").returncode == 0
    answer = llm_process("-m", "echo", "still works")
    assert answer.returncode == 0 and "still works" in answer.stdout


def test_saves_from_two_processes_at_once_both_complete(user_path):
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from llm.cli import cli\n"
        "name = sys.argv[1]\n"
        "for i in range(15):\n"
        "    r = CliRunner().invoke(cli, ['lb', 'save', name, 'echo', 'echo', 'echo-needs-key', '--force'])\n"
        "    assert r.exit_code == 0, r.output\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, name]) for name in ("one", "two")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    folder = user_path / "loadbalancers"
    assert sorted(p.name for p in folder.iterdir()) == ["one.yaml", "two.yaml"]
    for name in ("one", "two"):
        data = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert [m["model"] for m in data["members"]] == ["echo", "echo", "echo-needs-key"]


def test_help_carries_examples(run_llm):
    assert "llm lb save fast" in run_llm("lb", "--help").stdout
    for command in ("save", "list", "show", "remove", "path", "edit", "reset", "stats"):
        result = run_llm("lb", command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.stdout, command
