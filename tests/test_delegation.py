"""`lb:NAME` models with echo and test models: rotation, delegation, errors (issue 3). In this
process (click's runner, llm's Python API), but for the rotation shared by processes one after
another and at once."""

import asyncio
import importlib.metadata
import json
import sqlite3
import subprocess
import sys
import textwrap
import threading

import llm
import pytest
from conftest import invoke, last_logged, llm_process, set_keys

KEYS = {"k1": "value-1", "k2": "value-2", "k3": "value-3", "k4": "value-4"}


@pytest.fixture
def keyed(run_llm, user_path):
    "Saves lb:NAME with members echo-needs-key key=k1 .. kN: the answer shows which one ran."

    def save(name, count=3, *flags):
        set_keys(user_path, **KEYS)
        members = [f"echo-needs-key key=k{i}" for i in range(1, count + 1)]
        result = run_llm("lb", "save", name, *members, *flags)
        assert result.exit_code == 0, result.output

    return save


def member_of(text):
    "Which keyed member answered: 1 for value-1, ..."
    return int(json.loads(text)["key"].split("-")[1])


def test_consecutive_processes_take_turns(keyed):
    keyed("fast", 3)
    answered = []
    for _ in range(4):
        result = llm_process("-m", "lb:fast", "hi")
        assert result.returncode == 0, result.stderr
        answered.append(member_of(result.stdout))
    assert answered == [1, 2, 3, 1]


def test_processes_at_once_share_the_rotation_exactly(keyed, tmp_path):
    keyed("par", 4)
    script = textwrap.dedent(
        """
        import collections, json, llm
        model = llm.get_model("lb:par")
        counts = collections.Counter(
            json.loads(model.prompt("hi").text())["key"] for _ in range(100)
        )
        print(json.dumps(counts))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    total = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        for key, count in json.loads(out).items():
            total[key] = total.get(key, 0) + count
    assert total == {"value-1": 100, "value-2": 100, "value-3": 100, "value-4": 100}


def test_reset_and_changed_members_start_again(run_llm, keyed):
    keyed("r", 3)
    model = llm.get_model("lb:r")
    assert [member_of(model.prompt("x").text()) for _ in range(2)] == [1, 2]
    assert run_llm("lb", "reset", "r").exit_code == 0
    assert member_of(llm.get_model("lb:r").prompt("x").text()) == 1
    # Saving with different members starts the rotation again too
    run_llm("lb", "save", "r", "echo-needs-key key=k2", "echo-needs-key key=k3", "--force")
    assert member_of(llm.get_model("lb:r").prompt("x").text()) == 2


def test_state_lives_in_sqlite_not_in_the_yaml(keyed, user_path):
    keyed("s", 2)
    before = (user_path / "loadbalancers" / "s.yaml").read_text()
    llm.get_model("lb:s").prompt("x").text()
    assert (user_path / "loadbalancers" / "s.yaml").read_text() == before
    members = json.loads(invoke("lb", "stats", "s", "--json").stdout)[0]["members"]
    assert [member["requests"] for member in members] == [1, 0]
    assert (user_path / "loadbalancers.db").exists()


def test_corrupt_state_file_warns_once_and_still_answers(keyed, user_path, capsys, monkeypatch):
    keyed("c", 2)
    (user_path / "loadbalancers.db").write_bytes(b"this is not a database" * 100)
    model = llm.get_model("lb:c")
    answers = [member_of(model.prompt("x").text()) for _ in range(3)]
    assert set(answers) <= {1, 2}
    err = capsys.readouterr().err
    assert err.count("Warning: llm-loadbalancer cannot use its state file") == 1


def test_locked_state_file_does_not_block_the_prompt(keyed, user_path, monkeypatch):
    monkeypatch.setenv("LLM_LOADBALANCER_STATE_TIMEOUT", "0.2")  # read as the file is opened
    keyed("l", 2)
    llm.get_model("lb:l").prompt("x").text()  # creates the state file
    holder = sqlite3.connect(user_path / "loadbalancers.db", isolation_level=None)
    holder.execute("begin exclusive")
    try:
        result = invoke("-m", "lb:l", "hi")
    finally:
        holder.execute("rollback")
    assert result.exit_code == 0, result.output
    assert member_of(result.stdout) in (1, 2)
    assert "cannot use its state file" in result.stderr
    assert "it is busy: another process holds its lock" in result.stderr
    assert "now hold only within this process" in result.stderr


# --- delegation: options, keys ----------------------------------------------------------


def test_member_options_defaults_and_prompt_options(run_llm, user_path):
    run_llm("lb", "save", "o", "echo example_bool=true", "echo")
    # A default for the member's model applies under the member's saved options
    run_llm("models", "options", "set", "echo", "example_bool", "false")
    first = json.loads(run_llm("-m", "lb:o", "hi").stdout)
    second = json.loads(run_llm("-m", "lb:o", "hi").stdout)
    assert first["options"] == {"example_bool": True}  # saved option wins over the default
    assert second["options"] == {"example_bool": False}  # the model default applies
    # Options given at prompt time override both
    third = json.loads(run_llm("-m", "lb:o", "-o", "example_bool", "0", "hi").stdout)
    assert third["options"] == {"example_bool": False}
    fourth = json.loads(run_llm("-m", "lb:o", "-o", "example_bool", "1", "hi").stdout)
    assert fourth["options"] == {"example_bool": True}
    # ... and so do defaults set for lb:o itself
    run_llm("models", "options", "set", "lb:o", "example_bool", "true")
    fifth = json.loads(run_llm("-m", "lb:o", "hi").stdout)
    assert fifth["options"] == {"example_bool": True}
    # options_json in the logs is what lb:o received
    assert last_logged()[0]["options_json"] == {"example_bool": True}


def test_a_balancer_keeps_its_state_and_model_options_in_the_llm_folder_it_came_from(
    run_llm, user_path, tmp_path, monkeypatch
):
    from llm_loadbalancer import config, store

    run_llm("lb", "save", "home", "echo", "echo")
    run_llm("models", "options", "set", "echo", "example_bool", "true")
    model = llm.get_model("lb:home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("LLM_USER_PATH", str(elsewhere))  # after the model was got
    answers = [json.loads(model.prompt("hi").text()) for _ in range(2)]
    assert [answer["options"] for answer in answers] == [{"example_bool": True}] * 2
    assert not (elsewhere / "loadbalancers.db").exists()
    monkeypatch.setenv("LLM_USER_PATH", str(user_path))
    home = config.load("home")
    assert [member["requests"] for member in store.open_store(home).stats(home)] == [1, 1]


def test_a_members_prompt_is_a_copy_as_copy_copy_makes_it(user_path):
    import copy

    from llm_loadbalancer.speed import shallow_copy

    prompt = llm.get_model("echo").conversation().prompt("hi", system="be brief").prompt
    copied = shallow_copy(prompt)
    assert type(copied) is type(prompt) and copied is not prompt
    assert vars(copied) == vars(copy.copy(prompt))
    copied.options = None
    assert prompt.options is not None  # the member's own options do not reach the outer prompt

    class Custom:  # a class that says how it is copied is copied its own way
        def __init__(self):
            self.copies = 0

        def __copy__(self):
            new = Custom()
            new.copies = self.copies + 1
            return new

    class Slotted:
        __slots__ = ("value",)

    class Items(dict):  # its items are not in its __dict__
        pass

    assert shallow_copy(Custom()).copies == 1
    slotted = Slotted()
    slotted.value = 3
    assert shallow_copy(slotted).value == 3
    assert shallow_copy(Items(a=1)) == {"a": 1}


def test_a_key_model_is_told_as_isinstance_tells_it(user_path):
    from llm_loadbalancer.speed import key_model

    class Keyed(llm.KeyModel):
        model_id = "keyed"

        def execute(self, prompt, stream, response, conversation=None, key=None):
            yield "x"

    class Proxy:  # its __class__ is the wrapped model's, which isinstance reads too
        def __init__(self, inner):
            self.inner = inner

        @property
        def __class__(self):
            return self.inner.__class__

    echo = llm.get_model("echo")
    for model in (Keyed(), echo, Keyed(), Proxy(Keyed()), Proxy(echo), Proxy(Keyed())):
        assert key_model(model) is isinstance(model, (llm.KeyModel, llm.AsyncKeyModel))


def test_lb_options_are_those_the_members_share(run_llm, fake_models):
    run_llm("lb", "save", "shared", "plain-sync", "strict")
    result = run_llm("models", "--options", "-m", "lb:shared")
    assert "temperature: float" in result.stdout
    assert "seed" not in result.stdout
    bad = run_llm("-m", "lb:shared", "-o", "seed", "3", "hi")
    assert bad.exit_code == 1
    assert "seed" in bad.stderr


def test_member_keys_and_pass_through_key(run_llm, user_path):
    set_keys(user_path, work="value-work")
    run_llm("lb", "save", "k", "echo-needs-key key=work", "echo-needs-key")
    first = json.loads(run_llm("-m", "lb:k", "--key", "given-at-prompt", "hi").stdout)
    second = json.loads(run_llm("-m", "lb:k", "--key", "given-at-prompt", "hi").stdout)
    # The member's own key wins; --key applies to the member without one
    assert first["key"] == "value-work"
    assert second["key"] == "given-at-prompt"
    # --key may name a stored key, as with llm itself
    run_llm("lb", "reset", "k")
    run_llm("-m", "lb:k", "--key", "work", "hi")
    assert json.loads(run_llm("-m", "lb:k", "--key", "work", "hi").stdout)["key"] == "value-work"


# --- delegation: everything the member does reaches the user and the logs ---------------


def test_logs_show_the_resolved_member(run_llm, user_path):
    run_llm("lb", "save", "fast", "echo", "echo example_bool=true")
    run_llm("-m", "lb:fast", "hi")
    row = last_logged()[0]
    assert row["model"] == "lb:fast"
    assert row["resolved_model"] == "echo"
    assert row["input_tokens"] == 1 and row["output_tokens"] > 0
    text = run_llm("logs", "-n", "1").stdout
    assert "Model: **lb:fast** (resolved: **echo**)" in text
    found = json.loads(run_llm("logs", "--json", "-m", "echo").stdout)
    assert [r["model"] for r in found] == ["lb:fast"]


def test_system_fragments_and_attachments_reach_the_member(run_llm, tmp_path):
    run_llm("lb", "save", "a", "echo", "echo")
    fragment = tmp_path / "fragment.txt"
    fragment.write_text("fragment text")
    png = tmp_path / "pixel.png"
    png.write_bytes(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cfc0f01f0005000201a3a3ac1f0000000049454e44ae426082"
        )
    )
    result = run_llm("-m", "lb:a", "-s", "be brief", "-f", str(fragment), "-a", str(png), "hi")
    data = json.loads(result.stdout)
    assert data["system"] == "be brief"
    assert data["prompt"] == "fragment text\nhi"
    assert data["attachments"][0]["type"] == "image/png"


ECHO_VERSION = tuple(int(part) for part in importlib.metadata.version("llm-echo").split(".")[:2])


@pytest.mark.skipif(
    ECHO_VERSION < (0, 5), reason="echo's thinking option is llm-echo 0.5's (Python 3.11 and later)"
)
def test_streaming_reasoning_events_and_usage_through_the_python_api(run_llm):
    run_llm("lb", "save", "t", "echo thinking=true", "echo thinking=true")
    response = llm.get_model("lb:t").prompt("hi")
    events = list(response.stream_events())
    assert [e.type for e in events] == ["reasoning", "reasoning", "text"]
    assert response.resolved_model == "echo"
    assert response.usage().input == 1


def test_async_twin(run_llm):
    run_llm("lb", "save", "as", "echo", "echo example_bool=true")

    async def go():
        model = llm.get_async_model("lb:as")
        texts = [await model.prompt("hi").text() for _ in range(2)]
        return [json.loads(t).get("options") for t in texts]

    assert asyncio.run(go()) == [None, {"example_bool": True}]
    result = run_llm("-m", "lb:as", "--async", "hello")
    assert json.loads(result.stdout)["prompt"] == "hello"


def test_tool_result_turn_goes_to_the_member_that_called(run_llm):
    run_llm("lb", "save", "tools", "echo", "echo example_bool=true", "echo")
    run_llm("-m", "lb:tools", "warm up")  # the rotation is now at member 2
    call = json.dumps({"prompt": "use it", "tool_calls": [{"name": "llm_version"}]})
    result = run_llm("-m", "lb:tools", "-T", "llm_version", call)
    assert result.exit_code == 0, result.output
    rows = last_logged(2)
    assert [r["tool_calls"] != [] for r in rows] == [True, False]
    final = json.loads(rows[1]["response"])
    assert final["tool_results"][0]["output"] == importlib.metadata.version("llm")
    # Both turns were answered by member 2 (example_bool=true), though member 3 was next
    assert [json.loads(r["response"]).get("options") for r in rows] == [
        {"example_bool": True},
        {"example_bool": True},
    ]


def test_sticky_keeps_a_conversation_on_its_first_member(keyed):
    keyed("st", 3, "--sticky")
    first = invoke("-m", "lb:st", "one")
    assert member_of(first.stdout) == 1
    other = invoke("-m", "lb:st", "unrelated")  # a new conversation moves on
    assert member_of(other.stdout) == 2
    again = invoke("-c", "two")  # continues the newest conversation: 'unrelated'
    assert member_of(again.stdout) == 2
    cid = last_logged(3)[0]["conversation_id"]
    back = invoke("--cid", cid, "three")
    assert member_of(back.stdout) == 1


def test_without_sticky_continued_conversations_rotate_and_see_history(keyed):
    keyed("ns", 2)
    invoke("-m", "lb:ns", "one")
    again = invoke("-c", "two")
    assert again.exit_code == 0, again.output
    assert member_of(again.stdout) == 2
    rows = last_logged(2)
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"]


def test_chat_through_a_balancer(keyed):
    keyed("ch", 2, "--sticky")
    result = invoke("chat", "-m", "lb:ch", input="hello\nsecond\nquit\n")
    assert result.exit_code == 0, result.output
    keys = [line for line in result.stdout.splitlines() if '"key"' in line]
    assert len(keys) == 2 and all("value-1" in line for line in keys)
    assert '"prompt": "hello"' in result.stdout  # the second turn saw the first


def test_member_that_cannot_stream_runs_without_streaming(run_llm, fake_models):
    run_llm("lb", "save", "mix", "plain-sync", "strict")
    model = llm.get_model("lb:mix")
    assert model.can_stream  # strict streams
    first = json.loads(model.prompt("hi").text())
    assert first["model"] == "plain-sync" and first["stream"] is False
    second = model.prompt("hi").text()
    assert second.startswith("strict: ") and json.loads(second[8:])["stream"] is True


def test_capabilities_are_those_of_all_members(run_llm, fake_models):
    run_llm("lb", "save", "caps", "echo", "plain-sync")
    model = llm.get_model("lb:caps")
    assert model.can_stream and not model.supports_schema and not model.supports_tools
    assert not model.attachment_types
    refused = run_llm("-m", "lb:caps", "--schema", "name str", "hi")
    assert refused.exit_code == 1 and "does not support schemas" in refused.stderr


def test_schema_reaches_the_member(run_llm, fake_models):
    run_llm("lb", "save", "sch", "plain-sync", "strict")
    result = run_llm("-m", "lb:sch", "--schema", "name str", "hi")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"]["properties"] == {"name": {"type": "string"}}


def test_debug_line_names_member_position_and_key_name(keyed):
    keyed("dbg", 2)
    result = invoke("-m", "lb:dbg", "hi", env={"LLM_LOADBALANCER_DEBUG": "1"})
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm-loadbalancer:")]
    assert lines == [
        "llm-loadbalancer: lb:dbg: member 1 (echo-needs-key, key: k1) at position 1 of 2, key: k1; "
        "chosen: rotation"
    ]
    assert "value-1" not in result.stderr


def test_models_lists_balancers_with_policy_and_members(run_llm):
    run_llm("lb", "save", "fast", "echo", "echo example_bool=true")
    assert (
        "LoadBalancer: lb:fast (roundrobin: echo, echo (example_bool=true))"
        in run_llm("models").stdout
    )


# --- errors at prompt time --------------------------------------------------------------


def prompt_error(*args):
    result = invoke(*args)  # an exception llm does not turn into an error message is raised
    assert result.exit_code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_member_no_longer_installed_is_skipped_with_a_warning(run_llm, user_path):
    run_llm("lb", "save", "mix", "echo", "echo example_bool=true", "echo")
    path = user_path / "loadbalancers" / "mix.yaml"
    path.write_text(path.read_text().replace("model: echo\n", "model: uninstalled-model\n", 1))
    answered = []
    for _ in range(3):
        result = run_llm("-m", "lb:mix", "hi")
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines() == [
            "Warning: lb:mix: member 1 (uninstalled-model): unknown model 'uninstalled-model': "
            "'llm models' lists them: skipped; install the plugin that provides it, or remove "
            "the member with 'llm lb edit mix'"
        ]
        answered.append("options" in json.loads(result.stdout))
    assert answered == [True, False, True]  # members 2 and 3 take turns
    listed = run_llm("lb", "list").stdout
    assert "warning: member 1 (uninstalled-model): unknown model" in listed
    assert "[not installed]" in run_llm("models").stdout


def test_each_balancers_options_are_described(run_llm):
    run_llm("lb", "save", "one", "echo", "echo")
    run_llm("lb", "save", "two", "echo", "echo")
    listed = run_llm("models", "--options").stdout
    for name in ("one", "two"):
        block = listed.split(f"lb:{name} ")[1].split("\nLoadBalancer")[0]
        assert "example_bool: boolean\n      " in block  # the description follows the option


def test_no_member_installed(run_llm, user_path):
    run_llm("lb", "save", "gone", "echo", "echo")
    path = user_path / "loadbalancers" / "gone.yaml"
    path.write_text(path.read_text().replace("model: echo\n", "model: uninstalled-model\n"))
    line = prompt_error("-m", "lb:gone", "hi")
    assert line.startswith(
        f"Error: lb:gone: {path}: no member is installed: member 1 (uninstalled-model): "
        "unknown model"
    )
    assert "echo" in invoke("models").stdout


def test_hand_edited_nesting(run_llm, user_path):
    run_llm("lb", "save", "inner", "echo", "echo")
    (user_path / "loadbalancers" / "outer.yaml").write_text("members: [echo, 'lb:inner']\n")
    line = prompt_error("-m", "lb:outer", "hi")
    outer = user_path / "loadbalancers" / "outer.yaml"
    assert line.startswith(f"Error: lb:outer: {outer}: member 2 (lb:inner)")
    assert "cannot contain other load balancers" in line


def test_broken_file_is_reported_when_prompted(user_path):
    folder = user_path / "loadbalancers"
    folder.mkdir()
    (folder / "bad.yaml").write_text("members: [echo\n")
    line = prompt_error("-m", "lb:bad", "hi")
    assert line.startswith(f"Error: lb:bad: {folder / 'bad.yaml'}: not valid YAML")


def test_async_over_a_sync_only_member_answers_every_prompt_half_from_each(run_llm, fake_models):
    # issue 23's check (llm-markov by hand): a member whose plugin has no async model runs its
    # sync model in a thread of its own
    run_llm("lb", "save", "sy", "sync-stream", "echo")
    answers = []
    for _ in range(4):
        result = run_llm("-m", "lb:sy", "--async", "hi")
        assert result.exit_code == 0, result.output
        answers.append("sync" if result.stdout.strip() == "one two" else "echo")
    assert sorted(answers) == ["echo", "echo", "sync", "sync"]
    from fake_models import SYNC_EVENTS

    # in a thread of its own, never the event loop's
    assert SYNC_EVENTS == ["llm-loadbalancer member", "finished", "closed"] * 2
    logged = [row for row in last_logged(4) if row["resolved_model"] == "sync-stream"]
    assert [(row["input_tokens"], row["output_tokens"]) for row in logged] == [(3, 5)] * 2
    assert run_llm("lb", "show", "sy").exit_code == 0


def test_a_sync_only_members_chunks_reach_an_async_caller_as_they_come(run_llm, fake_models):
    from fake_models import GATE

    member = "sync-stream wait=after tool=true"
    assert run_llm("lb", "save", "st", member, member).exit_code == 0

    async def go():
        response = llm.get_async_model("lb:st").prompt("hi")
        chunks = []
        async for chunk in response:
            chunks.append((chunk, GATE.is_set()))
            GATE.set()  # the member waits for this after its first chunk
        return chunks, await response.tool_calls(), await response.usage()

    chunks, tool_calls, usage = asyncio.run(go())
    # the first chunk came while the member was still at work on the second
    assert chunks == [("one ", False), ("two", True)]
    assert [(call.name, call.arguments) for call in tool_calls] == [("lookup", {"q": "x"})]
    assert (usage.input, usage.output) == (3, 5)


def test_an_async_caller_that_stops_reading_ends_the_sync_members_thread(run_llm, fake_models):
    from fake_models import GATE, SYNC_EVENTS

    member = "sync-stream wait=after"
    assert run_llm("lb", "save", "cut", member, member).exit_code == 0

    async def go():
        async for chunk in llm.get_async_model("lb:cut").prompt("hi"):
            return chunk  # the caller stops reading (as on Ctrl-C): the loop then ends

    assert asyncio.run(go()) == "one "
    workers = [t for t in threading.enumerate() if t.name == "llm-loadbalancer member"]
    GATE.set()  # the member's next chunk is never handed over: its generator is closed
    for worker in workers:
        worker.join(30)
    assert workers and not any(worker.is_alive() for worker in workers)
    assert SYNC_EVENTS == ["llm-loadbalancer member", "closed"]  # closed, never finished


def test_a_sync_only_member_reads_an_async_conversation_as_a_sync_one(run_llm, fake_models):
    member = "sync-stream recall=true"
    assert run_llm("lb", "save", "conv", member, member).exit_code == 0

    async def go():
        conversation = llm.get_async_model("lb:conv").conversation()
        return [await conversation.prompt(text).text() for text in ("first", "second")]

    # the second turn sees the first answer's text (not a coroutine: AsyncResponse.text)
    assert asyncio.run(go()) == ["one two", "[one two] one two"]


def test_a_sync_only_member_whose_clean_up_fails_when_stopped_shows_nothing(
    run_llm, fake_models, monkeypatch
):
    from fake_models import GATE, SYNC_EVENTS

    member = "sync-stream wait=after broken_close=true"
    assert run_llm("lb", "save", "bc", member, member).exit_code == 0
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)

    async def go():
        async for chunk in llm.get_async_model("lb:bc").prompt("hi"):
            return chunk

    assert asyncio.run(go()) == "one "
    workers = [t for t in threading.enumerate() if t.name == "llm-loadbalancer member"]
    GATE.set()
    for worker in workers:
        worker.join(30)
    # nothing printed ("Exception in thread ..."): nobody reads the member any more
    assert SYNC_EVENTS == ["llm-loadbalancer member", "closed"] and uncaught == []


def test_a_sync_only_member_that_misses_the_timeout_in_async_fails_over(run_llm, fake_models):
    from fake_models import GATE, SYNC_EVENTS

    flags = ("--timeout", "0.2", "--policy", "failover")
    assert run_llm("lb", "save", "slow", "sync-stream wait=before", "echo", *flags).exit_code == 0
    result = run_llm("-m", "lb:slow", "--async", "hi")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "hi"  # echo answered
    GATE.set()
    for worker in [t for t in threading.enumerate() if t.name == "llm-loadbalancer member"]:
        worker.join(30)
    assert SYNC_EVENTS == ["llm-loadbalancer member", "closed"]  # abandoned: closed, not finished


def test_option_a_member_rejects(run_llm, fake_models):
    run_llm("lb", "save", "rej", "strict", "plain-sync")
    result = run_llm("-m", "lb:rej", "-o", "temperature", "1.5", "hi")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(
        "Error: lb:rej: member 1 (strict): option 'temperature'"
    )
    assert "at most 1.0" in result.stderr


def test_key_name_that_is_not_stored(run_llm, user_path):
    set_keys(user_path, work="value-work")
    run_llm("lb", "save", "ks", "echo-needs-key key=work", "echo")
    (user_path / "keys.json").write_text("{}")  # the key was removed after saving
    line = prompt_error("-m", "lb:ks", "hi")
    path = user_path / "loadbalancers" / "ks.yaml"
    assert line.startswith(f"Error: lb:ks: {path}: member 1 (echo-needs-key, key: (not stored))")
    assert "not the name of a stored key" in line
