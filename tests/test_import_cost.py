"""What every llm process pays for the plugin: which of its modules each step imports (checked in
a new process, where nothing is imported yet), and that Member and Balancer, whose methods
config.py writes out instead of letting ``@dataclass(frozen=True)`` build them, behave as that
decorator's would. No timings: they belong to bench/run.py."""

import copy
import dataclasses
import inspect
import json
import pickle
import subprocess
import sys

import pytest
from conftest import process_env, save_lb

from llm_loadbalancer.config import Balancer, Member

# What a model lookup imports when balancers are saved: reading and checking their files, and
# the model classes. What prompting needs (delegate.py and the state it keeps), the commands
# and the embedding balancers are imported when they are used.
LOOKUP = {
    "llm_loadbalancer",
    "llm_loadbalancer.registration",
    "llm_loadbalancer.config",
    "llm_loadbalancer.members",
    "llm_loadbalancer.model",
    "llm_loadbalancer.speed",
}
COMMANDS_ONLY = {"llm_loadbalancer.commands"}
EMBEDDING_ONLY = {"llm_loadbalancer.embedding", "llm_loadbalancer.batch"}

# Run in a new process: what each step has imported of the plugin (and whether queue is).
SCRIPT = """
import json, sys
def loaded():
    return sorted(name for name in sys.modules if name.split(".")[0] == "llm_loadbalancer")
steps = {}
import llm.cli  # loads the plugins and registers the commands, as every llm command does
steps["start"] = loaded()
import llm
llm.get_model("echo")
steps["lookup"] = loaded()
if sys.argv[1:]:
    steps["queue before"] = "queue" in sys.modules
    llm.get_model(sys.argv[1]).prompt("hi").text()
    steps["prompt"] = loaded()
    steps["queue"] = "queue" in sys.modules
print(json.dumps(steps))
"""


def imported_at_each_step(*model):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *model],
        capture_output=True,
        text=True,
        env=process_env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_each_step_imports_only_what_it_needs(user_path):
    save_lb("two", "echo", "echo example_bool=true")
    steps = imported_at_each_step("lb:two")
    # llm --version, llm --help, llm logs ...: the package alone
    assert steps["start"] == ["llm_loadbalancer"]
    # a model lookup (every llm command that names a model): registration, not the rest
    assert set(steps["lookup"]) == LOOKUP
    # a prompt to a chat balancer: no commands, no embedding modules, and no queue (it is only
    # for a member under a timeout) unless llm had imported it already
    prompt = set(steps["prompt"])
    assert "llm_loadbalancer.delegate" in prompt
    assert not prompt & {*COMMANDS_ONLY, *EMBEDDING_ONLY}, sorted(prompt)
    assert steps["queue"] == steps["queue before"]


def test_without_balancers_a_model_lookup_imports_nothing_more(user_path):
    steps = imported_at_each_step()
    assert steps["lookup"] == steps["start"] == ["llm_loadbalancer"]


def _reference(cls):
    "A ``@dataclass(frozen=True)`` with the same fields as ``cls``."
    return dataclasses.make_dataclass(
        cls.__name__,
        [
            (
                f.name,
                f.type,
                dataclasses.field(
                    default=f.default,
                    default_factory=f.default_factory,
                    repr=f.repr,
                    hash=f.hash,
                    compare=f.compare,
                ),
            )
            for f in dataclasses.fields(cls)
        ],
        frozen=True,
    )


MEMBERS = [
    Member("echo"),
    Member("echo", key="work", options={"example_bool": True}, weight=3, rpm=5, tpd=9),
    Member("echo", key="work", options={"thinking": True}, weight=3, rpm=5, tpd=9),
    Member(model="gpt", rpd=1, tpm=2),
]


@pytest.mark.parametrize("cls", [Member, Balancer])
def test_the_written_out_methods_take_the_arguments_dataclass_would(cls):
    ours = inspect.signature(cls.__init__).parameters
    reference = inspect.signature(_reference(cls).__init__).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [
        (p.name, p.kind) for p in reference.values()
    ]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, parameter in ours.items():
        if name == "self":
            continue
        field = fields[name]
        if field.default is not dataclasses.MISSING:
            assert parameter.default == field.default, name
        elif field.default_factory is not dataclasses.MISSING:  # made when not given
            assert parameter.default is not inspect.Parameter.empty, name
        else:
            assert parameter.default is inspect.Parameter.empty, name
    shown = [inspect.signature(c).replace(return_annotation=None) for c in (cls, _reference(cls))]
    assert str(shown[0]) == str(shown[1])  # as help() shows them: the same, <factory> too
    # and each argument is kept as its field (not left to the class's default)
    values = {name: object() for name in fields}
    made = cls(**values)
    assert all(getattr(made, name) is value for name, value in values.items())


def _as_reference(value, classes):
    "The same value built with the reference classes (members of a balancer too)."
    cls = classes[type(value)]
    data = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if "members" in data:
        data["members"] = tuple(_as_reference(m, classes) for m in data["members"])
    return cls(**data)


def test_they_compare_hash_show_and_refuse_changes_as_dataclass_would():
    classes = {Member: _reference(Member), Balancer: _reference(Balancer)}
    balancers = [
        Balancer("a", tuple(MEMBERS[:2])),
        Balancer("a", tuple(MEMBERS[:2]), user_dir="/elsewhere"),  # user_dir is not compared
        Balancer("a", tuple(MEMBERS[1:3]), policy="random", timeout=2.0, kind="embedding"),
        Balancer("b", (MEMBERS[3],), sticky=True, state="local", state_key="k"),
    ]
    values = MEMBERS + balancers
    for one in values:
        ref_one = _as_reference(one, classes)
        assert repr(one) == repr(ref_one)
        assert hash(one) == hash(ref_one)
        for other in values:
            assert (one == other) == (ref_one == _as_reference(other, classes)), (one, other)
        assert one.__eq__(3) is NotImplemented
        field, other_field = ("model", "key") if isinstance(one, Member) else ("name", "policy")
        for name, delete in ((field, False), ("anything", False), (other_field, True)):
            messages = []
            for target in (one, ref_one):
                with pytest.raises(dataclasses.FrozenInstanceError) as refused:
                    delattr(target, name) if delete else setattr(target, name, "x")
                messages.append(str(refused.value))
            assert messages[0] == messages[1]
        assert pickle.loads(pickle.dumps(one)) == one
        assert copy.deepcopy(one) == one and copy.copy(one) == one
        assert dataclasses.asdict(one) == dataclasses.asdict(ref_one)
    # each default_factory value is the instance's own
    assert Member("x").options == {} and Member("x").options is not Member("x").options
    changed = dataclasses.replace(balancers[0], user_dir="/x", policy="failover")
    assert (changed.user_dir, changed.policy) == ("/x", "failover")
    assert changed.members == balancers[0].members
