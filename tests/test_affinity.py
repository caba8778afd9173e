"""Prompt-cache affinity (issue 21): a prompt whose system prompt, fragments and attachments
make a long prefix goes back to the member that last served it, while ``affinity`` seconds
have not passed, and while that member is available. The prefix is read from llm's own prompt
(``affinity.prefix``, pure); the tie is the store's, in both backends (test_store.py's
backend fixture); across processes through llm's OpenAI plugin and the local server."""

import json
import subprocess
import sys

import llm
import pytest
from conftest import NOW, invoke, process_env, save_lb
from store_helpers import echo
from test_store import backend  # noqa: F401 (the fixture: each test runs on both backends)

from llm_loadbalancer import affinity, config
from llm_loadbalancer.store import Outcome

LONG = "You are a careful assistant. " * 160  # 4,640 bytes: more than MIN_PREFIX_BYTES

# --- the prefix --------------------------------------------------------------------------------


def test_a_long_system_prompt_is_a_prefix_whatever_the_prompt_text():
    model = llm.get_model("echo")
    first = affinity.prefix(llm.Prompt("one question", model, system=LONG))
    assert first is not None and len(first) == 64 and LONG not in first
    assert affinity.prefix(llm.Prompt("another question", model, system=LONG)) == first
    assert affinity.prefix(llm.Prompt("one question", model, system=LONG + "!")) != first


def test_fragments_and_attachments_are_part_of_it_a_short_one_is_none(tmp_path):
    model = llm.get_model("echo")
    assert affinity.prefix(llm.Prompt("q", model, system="be brief")) is None
    assert affinity.prefix(llm.Prompt("q" * 9000, model)) is None  # the prompt's own text
    by_fragment = affinity.prefix(llm.Prompt("q", model, fragments=[LONG]))
    assert by_fragment is not None
    assert by_fragment != affinity.prefix(llm.Prompt("q", model, system=LONG))
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG" + b"0" * 100)
    pictured = llm.Prompt("q", model, attachments=[llm.Attachment(path=str(image))])
    assert affinity.prefix(pictured) is not None  # an attachment counts 1,600 tokens


# --- the tie, in the store ---------------------------------------------------------------------


def served(st, balancer, now, prefix=None, took=0.0):
    """The first member of a prompt chosen at ``now``, which then succeeds ``took`` seconds
    later, its prefix's tie stored as a prompt stores it (``affinity.refresh``)."""
    choice = st.choose(balancer, now=now, prefix=prefix)
    member = choice.plan.order[0]
    if prefix and not affinity.refresh(choice.home, member, choice.now):
        prefix = None
    st.record(balancer, member, Outcome(prefix=prefix), ticket=choice.ticket, now=now + took)
    return member, choice.plan.why


def test_a_long_prefix_goes_back_to_its_member_and_the_rotation_stays_exact(backend):  # noqa: F811
    balancer, st = backend.open("aff", echo(), echo(), echo(), affinity=300)
    assert served(st, balancer, NOW, "p1")[0] == 0  # the first of its prefix: the rotation
    assert served(st, balancer, NOW + 1)[0] == 1
    member, why = served(st, balancer, NOW + 13, "p1")
    assert (member, why) == (0, "affinity (prefix p1…, 13 s ago)")
    assert [served(st, balancer, NOW + 14 + i)[0] for i in range(4)] == [2, 0, 1, 2]
    assert served(st, balancer, NOW + 20, "p2")[0] == 0  # another prefix: the rotation
    assert served(st, balancer, NOW + 21, "p2")[0] == 0
    assert st.affinity(balancer, now=NOW + 21) == {"routed": 2, "prefixes": 2}


def test_a_prefix_is_forgotten_after_affinity_seconds_without_use(backend):  # noqa: F811
    balancer, st = backend.open("old", echo(), echo(), affinity=60)
    assert served(st, balancer, NOW, "p")[0] == 0
    assert served(st, balancer, NOW + 60, "p")[0] == 0  # used again: 60 s more
    assert served(st, balancer, NOW + 121, "p")[0] == 1  # the rotation's turn: its new home
    assert served(st, balancer, NOW + 122, "p")[0] == 1
    assert st.affinity(balancer, now=NOW + 300)["prefixes"] == 0


def test_a_prefix_asked_for_many_times_a_second_is_stored_once_a_second(backend):  # noqa: F811
    balancer, st = backend.open("often", echo(), echo(), affinity=60)
    assert served(st, balancer, NOW, "p")[0] == 0
    # answered again within the second (5 s later each): the tie is not stored again ...
    assert [served(st, balancer, NOW + 0.1 * i, "p", took=5)[0] for i in range(1, 10)] == [0] * 9
    # ... so it is forgotten 60 s after it was stored, to the second of its last use
    assert served(st, balancer, NOW + 60.5, "p")[0] == 1
    # a second or more after it was stored, it is stored again
    assert served(st, balancer, NOW + 62, "p", took=5)[0] == 1
    assert served(st, balancer, NOW + 126, "p")[0] == 1  # (stored at NOW + 67)


def test_the_refresh_rule():
    assert affinity.refresh(None, 0, NOW)  # no tie yet
    assert affinity.refresh((1, NOW), 0, NOW + 0.5)  # another member served it
    assert not affinity.refresh((0, NOW), 0, NOW + 0.5)
    assert affinity.refresh((0, NOW), 0, NOW + affinity.REFRESH)
    assert affinity.refresh((0, NOW + 5), 0, NOW)  # stored ahead of this clock: again


def test_when_its_member_is_at_its_limit_the_prefix_goes_elsewhere_and_moves(backend):  # noqa: F811
    balancer, st = backend.open("full", echo(rpm=2), echo(), affinity=300, policy="failover")
    assert served(st, balancer, NOW, "p")[0] == 0
    assert served(st, balancer, NOW + 1, "p")[0] == 0
    assert served(st, balancer, NOW + 2, "p")[0] == 1  # member 1 is at its limit
    assert served(st, balancer, NOW + 3, "p")[0] == 1  # its new home


def test_without_affinity_a_prefix_changes_nothing(backend):  # noqa: F811
    balancer, st = backend.open("off", echo(), echo())
    assert [served(st, balancer, NOW + i, "p")[0] for i in range(4)] == [0, 1, 0, 1]


# --- through llm's OpenAI plugin, across processes ----------------------------------------------

SYSTEMS = [f"Prompt {number}: " + LONG * 2 for number in range(4)]  # four 9 KB system prompts

WORKER = """
import sys, llm
model = llm.get_model("lb:cache")
systems = [f"Prompt {n}: " + sys.argv[2] * 2 for n in range(4)]
start = int(sys.argv[1])
for step in range(4):
    model.prompt("long " + str(step), system=systems[(start + step) % 4], stream=False).text()
    model.prompt("short " + str(step), stream=False).text()
"""


def test_long_prefixes_from_many_processes_stay_on_their_key(local_openai):
    members = [f"local-{e} key={k}" for e in ("a", "b") for k in ("work", "personal")]
    save_lb("cache", *members, flags=("--affinity", "300"))
    for system in SYSTEMS:  # the first of each prefix, one after the other
        assert invoke("-m", "lb:cache", "-s", system, "first").exit_code == 0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(number), LONG],
            env=process_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for number in range(4)
    ]
    for proc in procs:  # (communicate: however much a worker writes, it is read, not left full)
        _, errors = proc.communicate(timeout=120)
        assert proc.returncode == 0, errors
    served = {}  # system prompt: the members that answered it
    shorts = []
    for request in local_openai.requests:
        messages = request["body"]["messages"]
        member = f"{request['endpoint']}/{request['key']}"
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            served.setdefault(system[0][:10], []).append(member)
        else:
            shorts.append(member)
    assert sorted(served) == sorted(s[:10] for s in SYSTEMS)
    assert all(len(set(members)) == 1 and len(members) == 5 for members in served.values())
    assert len(set(m[0] for m in served.values())) == 4  # the firsts went round the rotation
    # the 16 short prompts and the 4 firsts took turns exactly: 5 each
    firsts = [members[0] for members in served.values()]
    assert sorted({m: (shorts + firsts).count(m) for m in shorts + firsts}.values()) == [5] * 4
    stats = json.loads(invoke("lb", "stats", "cache", "--json").stdout)[0]
    assert stats["affinity"] == {"seconds": 300.0, "routed": 16, "prefixes": 4}


def test_affinity_is_saved_shown_and_refused_for_embeddings(user_path):
    save_lb("a", "echo", "echo", flags=("--affinity", "120"))
    assert config.load("a").affinity == 120.0
    assert "affinity: 120" in invoke("lb", "show", "a").stdout
    bad = invoke("lb", "save", "e", "--embedding", "--affinity", "5", "e1", "e2")
    assert bad.exit_code == 1
    result = invoke("lb", "save", "n", "echo", "echo", "--affinity", "-1")
    assert result.exit_code == 1 and "affinity must be a number of seconds" in result.stderr


@pytest.mark.parametrize("seconds", [0])
def test_affinity_zero_is_off_and_not_written(user_path, seconds):
    save_lb("z", "echo", "echo", flags=("--affinity", str(seconds)))
    assert "affinity" not in invoke("lb", "show", "z").stdout


@pytest.mark.parametrize("value", ["0|0|inf", "0|0|nan", "x|y|z"])
def test_a_malformed_prefix_tie_in_redis_is_reported_not_followed(redis_server, user_path, value):
    import dataclasses

    from llm_loadbalancer import store
    from llm_loadbalancer.store.redis import Malformed, RedisStore

    data = {"members": [echo(), echo()], "affinity": 300, "state": redis_server.url}
    balancer = dataclasses.replace(config.from_dict("bad", data), user_dir=str(user_path))
    st = store.open_store(balancer, fallback=False)
    redis_server.client().hset(RedisStore.prefix(balancer) + "prefixes", "prefix:p", value)
    with pytest.raises(Malformed, match="unexpected data for lb:bad"):
        st.choose(balancer, prefix="p")
