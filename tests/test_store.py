"""The store contract (``llm_loadbalancer.store.Store``): what every backend keeps for a
balancer across prompts and processes, tested through the Store API alone, once per backend:
``[sqlite]``, this machine's state file, and ``[redis]``, a real redis-server. Time moves only
through the ``now=`` the store is given (never by sleeping).

The rotation and the weighted cycle, limit windows (rpm, rpd, tpm, tpd) and waiting, claims,
cooldowns (stated or guessed, doubling, quotas, cleared by a success), prompts in flight
(least-busy), timings (lowest-latency), conversation ties (sticky, tool turns, forgotten after
KEEP_DAYS), reset, remove, a new definition, statistics, and what crosses processes (a few
real ones, where processes are the point). The choices themselves are policy.plan's, tested in
test_policy.py; what is the SQLite file's own (clock steps, folding old rows) is in
test_store_sqlite.py; what is Redis's own (machines, snapshots, fallback) in test_redis.py."""

import dataclasses
import pathlib
import random

import pytest
from conftest import NOW, invoke, run_workers, save_lb, set_keys
from store_helpers import Ask, chosen, echo

from llm_loadbalancer import config, store
from llm_loadbalancer.limits import POLL
from llm_loadbalancer.policy import schedule
from llm_loadbalancer.store import Outcome, rules
from llm_loadbalancer.store import sqlite as sqlite_store

DAY = 86400.0

class Backend:
    "Balancers whose state is in one backend, and their stores."

    def __init__(self, request, kind, user_path, server=None):
        self.request = request
        self.kind = kind
        self.user_path = user_path
        self.server = server
        self.url = server.url if server is not None else None

    def __repr__(self):
        return self.kind

    def balancer(self, name, *members, **settings) -> config.Balancer:
        "config.from_dict(name, {members, settings}), its state in this backend."
        data = {**settings, "members": list(members)}
        if self.url is not None:
            data["state"] = self.url
        return dataclasses.replace(config.from_dict(name, data), user_dir=str(self.user_path))

    def store(self, balancer):
        return store.open_store(balancer, fallback=False)

    def open(self, name, *members, **settings):
        "(a balancer, its store)"
        balancer = self.balancer(name, *members, **settings)
        return balancer, self.store(balancer)

    # --- real processes ---------------------------------------------------------------------

    def save(self, name, *members):
        """llm lb save NAME MEMBERS, the state in this backend; for Redis on two machines (two
        llm folders): this test's and machine B's."""
        flags = () if self.url is None else ("--state", self.url)
        save_lb(name, *members, flags=flags)
        if self.url is not None:
            other = self.machine_b()
            result = invoke("lb", "save", name, *members, *flags, env={"LLM_USER_PATH": other})
            assert result.exit_code == 0, result.output

    def machine_b(self) -> str:
        folder = self.user_path.parent / "machine-B"
        folder.mkdir(exist_ok=True)
        return str(folder)

    def worker_envs(self):
        "run_workers' envs: Redis's processes take turns between the two machines."
        if self.url is None:
            return None
        return [{"LLM_USER_PATH": str(self.user_path)}, {"LLM_USER_PATH": self.machine_b()}]

    def stats(self, name):
        balancer = config.load(name)
        return self.store(balancer).stats(balancer)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, user_path):
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return Backend(request, request.param, user_path, server)


def failed(error="500 server error: x", cooldown=30.0, stated=False, exact=False):
    return Outcome(error=error, cooldown=cooldown, stated=stated, exact=exact)


# --- the rotation ----------------------------------------------------------------------------


def test_the_rotation_gives_each_member_its_turn(backend):
    balancer, st = backend.open("rr", echo(), echo(), echo())
    choices = [st.choose(balancer, now=NOW + step) for step in range(4)]
    assert [c.plan.order for c in choices] == [(0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 1, 2)]
    assert all(c.plan.skipped == () and c.plan.wait is None for c in choices)
    assert all(c.ticket is None and c.cooled == frozenset() for c in choices)
    assert [c.now for c in choices] == [NOW + step for step in range(4)]


def test_weights_follow_the_smooth_weighted_cycle(backend):
    balancer, st = backend.open("w", echo(weight=5), echo(), echo(weight=2))
    firsts = [st.choose(balancer, now=NOW + step).plan.order[0] for step in range(16)]
    assert firsts == list(schedule((5, 1, 2))) * 2


def test_the_rotation_and_statistics_are_shared_by_every_process(backend):
    balancer = backend.balancer("shared", echo(weight=3), echo())
    first = backend.store(balancer)
    store.new_process()  # what follows is another process's
    second = backend.store(balancer)
    assert first is not second
    turns = [first, second, second, first, first, second, first, second]
    firsts = []
    for step, st in enumerate(turns):
        member = st.choose(balancer, now=NOW + step).plan.order[0]
        st.record(balancer, member, Outcome(), now=NOW + step)
        firsts.append(member)
    assert firsts == list(schedule((3, 1))) * 2
    for st in (first, second):
        assert [m["requests"] for m in st.stats(balancer, now=NOW + 8)] == [6, 2]


def test_the_weighted_rotation_is_exact_across_processes(backend):
    # 4 processes at once (Redis: on two machines), 100 prompts each, weights 3 and 1
    backend.save("w", "echo weight=3", "echo")
    assert run_workers("lb:w", 4, 100, backend.worker_envs()) == [(100, 0)] * 4
    assert [m["requests"] for m in backend.stats("w")] == [300, 100]  # 3 to 1, exactly


def test_a_request_is_counted_when_chosen_only_for_limits_and_least_busy(backend):
    plain, plain_store = backend.open("plain", echo(), echo())
    limited, limited_store = backend.open("limited", echo(rpm=10), echo())
    busy, busy_store = backend.open("busy", echo(), echo(), policy="least-busy")
    assert plain_store.choose(plain, now=NOW).ticket is None
    first = limited_store.choose(limited, now=NOW)
    assert first.plan.order[0] == 0 and first.ticket is not None
    assert limited_store.choose(limited, now=NOW + 1).ticket is None  # member 2: no limits
    assert limited_store.stats(limited, now=NOW + 1)[0]["limits"] == {
        "rpm": {"used": 1, "limit": 10}
    }
    tickets = [busy_store.choose(busy, now=NOW + step).ticket for step in range(2)]
    assert None not in tickets and tickets[0] != tickets[1]


def test_unavailable_members_are_never_chosen(backend):
    balancer, st = backend.open("u", echo(), echo(), echo())
    missing = frozenset({1})
    orders = [st.choose(balancer, unavailable=missing, now=NOW + s).plan.order for s in range(4)]
    assert orders == [(0, 2), (2, 0), (0, 2), (2, 0)]
    nothing = st.choose(balancer, unavailable=frozenset({0, 1, 2}), now=NOW + 4).plan
    assert (nothing.order, nothing.wait) == ((), None)


# --- limits and waiting ----------------------------------------------------------------------


def test_rpm_is_never_exceeded_and_the_member_is_used_again_when_its_window_has_room(backend):
    balancer, st = backend.open("lim", echo(rpm=2), echo(rpm=1))
    picks = [chosen(st, balancer, NOW + i).order[:1] for i in range(4)]
    assert picks == [(0,), (1,), (0,), ()]  # the fourth finds every member at its limit
    assert chosen(st, balancer, NOW + 3).wait == (NOW + 60, 0)  # a's first ages out first
    assert chosen(st, balancer, NOW + 61).order[0] == 1  # its turn, and room again


def test_rpd_holds_for_a_day(backend):
    balancer, st = backend.open("day", echo(rpd=2), echo())
    firsts = [chosen(st, balancer, NOW + hour * 3600).order for hour in range(6)]
    assert [order[0] for order in firsts] == [0, 1, 0, 1, 1, 1]
    assert firsts[4] == (1,)  # member 1 is left out, not tried last
    assert st.stats(balancer, now=NOW + 5 * 3600)[0]["limits"] == {
        "rpd": {"used": 2, "limit": 2}
    }
    assert chosen(st, balancer, NOW + DAY - 1).order == (1,)
    assert chosen(st, balancer, NOW + DAY).order[0] == 0  # its first request aged out


def test_token_limits_count_what_members_reported(backend):
    balancer, st = backend.open("tok", echo(tpm=100), echo())
    choice = st.choose(balancer, now=NOW)
    st.record(balancer, 0, Outcome(tokens_in=70, tokens_out=40), ticket=choice.ticket, now=NOW)
    for step in range(1, 4):
        assert chosen(st, balancer, NOW + step).order[0] == 1  # 110 tokens: a has no room
    assert chosen(st, balancer, NOW + 61).order[:1] == (0,)
    members = st.stats(balancer, now=NOW + 1)
    assert (members[0]["input_tokens"], members[0]["output_tokens"]) == (70, 40)
    assert members[0]["limits"] == {"tpm": {"used": 110, "limit": 100, "reserved": 0}}


def test_tpd_has_room_while_the_days_tokens_are_below_it(backend):
    balancer, st = backend.open("daily", echo(tpd=1000), echo(), policy="failover")
    first = st.choose(balancer, now=NOW)
    st.record(balancer, 0, Outcome(tokens_in=100, tokens_out=500), ticket=first.ticket, now=NOW)
    second = st.choose(balancer, now=NOW + 3600)
    assert second.plan.order[0] == 0  # 600 of 1000: room
    st.record(balancer, 0, Outcome(tokens_in=500), ticket=second.ticket, now=NOW + 3600)
    assert chosen(st, balancer, NOW + 7200).order == (1,)  # 1100: left out for the day
    assert st.stats(balancer, now=NOW + 7200)[0]["limits"] == {
        "tpd": {"used": 1100, "limit": 1000, "reserved": 0}
    }
    assert chosen(st, balancer, NOW + DAY - 1).order == (1,)
    assert chosen(st, balancer, NOW + DAY).order[0] == 0  # the first 600 aged out


def test_when_every_member_is_full_the_plan_waits_for_the_first_to_have_room(backend):
    balancer, st = backend.open("full", echo(rpm=1), echo(tpm=10))
    assert chosen(st, balancer, NOW).order[0] == 0
    choice = st.choose(balancer, now=NOW + 10)
    assert choice.plan.order[0] == 1
    st.record(balancer, 1, Outcome(tokens_in=20), ticket=choice.ticket, now=NOW + 10)
    waiting = st.choose(balancer, now=NOW + 20)
    assert (waiting.plan.order, waiting.plan.wait, waiting.ticket) == ((), (NOW + 60, 0), None)
    assert st.stats(balancer, now=NOW + 20)[0]["limits"]["rpm"]["used"] == 1  # nothing counted
    assert chosen(st, balancer, NOW + 60).order[0] == 0
    assert st.choose(balancer, now=NOW + 61).plan.wait == (NOW + 70, 1)  # its tokens age out


def test_requests_chosen_at_the_same_time_are_counted_in_order(backend):
    balancer, st = backend.open("same", echo(rpm=3), echo(), policy="failover")
    firsts = [st.choose(balancer, now=NOW).plan.order[0] for _ in range(5)]
    assert firsts == [0, 0, 0, 1, 1]  # never a 4th request in the minute


def test_a_claim_counts_a_request_while_the_member_has_room(backend):
    balancer, st = backend.open("claim", echo(), echo(rpm=2))
    assert st.choose(balancer, now=NOW).plan.order == (0, 1)  # member 2's request not counted
    tickets = [st.claim(balancer, 1, now=NOW + step) for step in (1, 2)]  # failing over to it
    assert False not in tickets and None not in tickets
    assert st.claim(balancer, 1, now=NOW + 3) is False  # at its limit: skip it
    assert st.stats(balancer, now=NOW + 3)[1]["limits"] == {"rpm": {"used": 2, "limit": 2}}
    # what was claimed counts for choices too: member 2's turn, and it is full
    assert chosen(st, balancer, NOW + 4).order == (0,)
    assert st.claim(balancer, 1, now=NOW + 62) not in (None, False)  # both aged out
    assert st.claim(balancer, 0, now=NOW + 63) is None  # no limits: nothing counted


def test_a_claim_is_refused_inside_a_stated_cooldown_not_a_guessed_one(backend):
    balancer, st = backend.open("claimcd", echo(rpm=100), echo(rpm=100))
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, failed("429 rate limited: wait", 100, stated=True), now=NOW)
    st.record(balancer, 1, failed("500 server error: x", 100), now=NOW)
    assert st.claim(balancer, 0, now=NOW + 99) is False
    assert st.claim(balancer, 1, now=NOW + 99) not in (None, False)
    assert st.claim(balancer, 0, now=NOW + 100) not in (None, False)  # its reset has come


def test_the_request_limit_is_exact_when_many_processes_reach_it_at_once(backend):
    # 4 processes at once (Redis: on two machines), 80 prompts each, 100 a day per member
    for folder in (backend.user_path, backend.machine_b()):
        set_keys(pathlib.Path(folder), a="key-a", b="key-b")
    backend.save("race", "echo key=a rpd=100", "echo key=b rpd=100")
    counts = run_workers("lb:race", 4, 80, backend.worker_envs())
    assert sum(done for done, _ in counts) == 200  # 2 members x 100, never a 101st
    limits_now = [member["limits"]["rpd"] for member in backend.stats("race")]
    assert limits_now == [{"used": 100, "limit": 100}] * 2


# --- token reservations: what prompts in flight will cost counts before they report ----------


def reported(st, balancer, member, choice_or_ticket, now, tokens_in=0, tokens_out=0, **more):
    "A prompt's outcome, with the tokens its member reported."
    ticket = getattr(choice_or_ticket, "ticket", choice_or_ticket)
    outcome = Outcome(tokens_in=tokens_in, tokens_out=tokens_out, **more)
    st.record(balancer, member, outcome, ticket=ticket, now=now)


def test_a_prompt_in_flight_reserves_its_estimate_so_a_token_limit_holds_under_concurrency(
    backend,
):
    balancer, st = backend.open("res", echo(tpm=300), echo(), policy="failover")
    ask = Ask(10)
    # no report yet: the answer cannot be estimated, so the first prompt goes alone
    first = st.choose(balancer, now=NOW, demand=ask)
    assert first.plan.order[0] == 0
    assert st.choose(balancer, now=NOW + 1, demand=ask).plan.order == (1,)
    reported(st, balancer, 0, first, NOW + 2, tokens_in=10, tokens_out=140)
    # 150 reported; the next is estimated at 10 + 140 (the largest answer): 300 fits, once
    second = st.choose(balancer, now=NOW + 3, demand=ask)
    assert second.plan.order[0] == 0
    limit = st.stats(balancer, now=NOW + 3)[0]["limits"]["tpm"]
    assert limit == {"used": 150, "limit": 300, "reserved": 150}
    assert st.choose(balancer, now=NOW + 4, demand=ask).plan.order == (1,)
    reported(st, balancer, 0, second, NOW + 5, tokens_in=10, tokens_out=140)
    assert st.stats(balancer, now=NOW + 5)[0]["limits"]["tpm"] == {
        "used": 300,
        "limit": 300,
        "reserved": 0,
    }
    assert st.choose(balancer, now=NOW + 6, demand=ask).plan.order == (1,)
    assert st.choose(balancer, now=NOW + 63, demand=ask).plan.order[0] == 0  # aged out


def test_while_prompts_in_flight_leave_no_room_the_plan_looks_again_shortly(backend):
    balancer, st = backend.open("soon", echo(tpm=300))
    first = st.choose(balancer, now=NOW, demand=Ask(10))
    waiting = st.choose(balancer, now=NOW + 1, demand=Ask(10))
    assert (waiting.plan.order, waiting.plan.wait) == ((), (NOW + 1 + POLL, 0))
    reported(st, balancer, 0, first, NOW + 2, tokens_in=10, tokens_out=100)
    assert st.choose(balancer, now=NOW + 2, demand=Ask(10)).plan.order == (0,)


def test_a_cap_on_the_answer_is_its_estimate_and_prompts_run_together_under_it(backend):
    balancer, st = backend.open("cap", echo(tpm=300), echo(), policy="failover")
    ask = Ask(20, cap=80)  # max_tokens 80: 100 a prompt, with no report yet
    firsts = [st.choose(balancer, now=NOW, demand=ask).plan.order[0] for _ in range(4)]
    assert firsts == [0, 0, 0, 1]
    assert st.stats(balancer, now=NOW)[0]["limits"]["tpm"]["reserved"] == 300


def test_what_a_report_misses_of_its_input_is_added_to_the_next_estimates(backend):
    balancer, st = backend.open("miss", echo(tpm=300), echo(), policy="failover")
    first = st.choose(balancer, now=NOW, demand=Ask(10))
    # the input was 60 tokens, not 10 (a template, a tokenizer that counts more), the answer 40
    reported(st, balancer, 0, first, NOW + 1, tokens_in=60, tokens_out=40)
    # 100 used; the next prompts are estimated at 10 + 50 missed + 40 answered = 100 each
    firsts = [st.choose(balancer, now=NOW + 2, demand=Ask(10)).plan.order[0] for _ in range(3)]
    assert firsts == [0, 0, 1]


def test_a_reservation_ends_with_the_prompt(backend):
    balancer, st = backend.open("ends", echo(tpm=300), echo(), policy="failover")
    primer = st.choose(balancer, now=NOW, demand=Ask(10))
    reported(st, balancer, 0, primer, NOW, tokens_in=10, tokens_out=90)  # 100 used
    # stopped before any chunk (finish): freed; failed before any chunk: freed
    st.finish(balancer, 0, st.choose(balancer, now=NOW + 1, demand=Ask(10)).ticket, now=NOW + 1)
    failing = st.choose(balancer, now=NOW + 2, demand=Ask(10))
    st.record(balancer, 0, failed(cooldown=None), ticket=failing.ticket, now=NOW + 2)
    assert st.stats(balancer, now=NOW + 2)[0]["limits"]["tpm"]["used"] == 100
    # answered without a report, or failed after its first chunk: its estimate is kept
    quiet = st.choose(balancer, now=NOW + 3, demand=Ask(10))
    st.record(balancer, 0, Outcome(), ticket=quiet.ticket, now=NOW + 3)
    cut = st.claim(balancer, 0, now=NOW + 4, demand=Ask(10))
    cut_off = Outcome(error="connection: cut", first_chunk=0.5)
    st.record(balancer, 0, cut_off, ticket=cut, now=NOW + 4)
    assert st.stats(balancer, now=NOW + 4)[0]["limits"]["tpm"] == {
        "used": 300,
        "limit": 300,
        "reserved": 0,
    }


def test_a_reservation_counts_while_its_lease_is_renewed_and_not_after_its_process_died(backend):
    balancer, st = backend.open("lease", echo(tpm=300), echo(), policy="failover")
    held = st.choose(balancer, now=NOW, demand=Ask(10)).ticket
    assert held.leased
    st.renew(balancer, 0, held, now=NOW + 40)
    assert st.choose(balancer, now=NOW + 60, demand=Ask(10)).plan.order == (1,)
    # not renewed again (its process died): it stops counting when its lease ends
    after = st.choose(balancer, now=NOW + 40 + rules.LEASE + 1, demand=Ask(10))
    assert after.plan.order[0] == 0


def test_a_reservation_holds_when_the_clock_is_set_back(backend):
    balancer, st = backend.open("back", echo(tpm=300), echo(), policy="failover")
    st.choose(balancer, now=NOW, demand=Ask(10))  # alone: no report yet
    assert st.choose(balancer, now=NOW - 30, demand=Ask(10)).plan.order == (1,)
    # a process that died then frees it within a lease of the clock being right
    assert st.choose(balancer, now=NOW + rules.LEASE + 1, demand=Ask(10)).plan.order[0] == 0


def test_a_prompt_estimated_above_the_whole_limit_goes_alone(backend):
    balancer, st = backend.open("big", echo(tpm=100), echo(), policy="failover")
    big = st.choose(balancer, now=NOW, demand=Ask(500))
    assert big.plan.order[0] == 0  # nothing in its window, nothing in flight
    assert st.choose(balancer, now=NOW + 1, demand=Ask(5)).plan.order == (1,)


def test_a_prompt_with_no_estimate_counts_as_before(backend):
    # (a batch of embeddings, whose size is not known): room while the window is below the limit
    balancer, st = backend.open("none", echo(tpm=100), echo(), policy="failover")
    choice = st.choose(balancer, now=NOW)
    assert choice.ticket is not None and not choice.ticket.leased
    reported(st, balancer, 0, choice, NOW, tokens_in=99)
    assert st.choose(balancer, now=NOW + 1).plan.order[0] == 0
    assert st.stats(balancer, now=NOW + 1)[0]["limits"]["tpm"]["reserved"] == 0


def test_token_reservations_hold_across_processes(backend):
    balancer = backend.balancer("procs", echo(tpm=300), echo(), policy="failover")
    first = backend.store(balancer)
    primer = first.choose(balancer, now=NOW, demand=Ask(10))
    reported(first, balancer, 0, primer, NOW, tokens_in=10, tokens_out=90)  # 100 used
    store.new_process()
    second = backend.store(balancer)
    assert first.choose(balancer, now=NOW + 1, demand=Ask(10)).plan.order[0] == 0
    assert second.choose(balancer, now=NOW + 1, demand=Ask(10)).plan.order[0] == 0
    assert first.choose(balancer, now=NOW + 1, demand=Ask(10)).plan.order == (1,)


# --- the provider's bucket: a limit belongs to the key (and the model) -----------------------


def test_two_balancers_using_one_key_share_its_limit(backend):
    one, st = backend.open("one", echo(key="work", rpm=2), echo(), policy="failover")
    two = backend.balancer("two", echo(key="work", rpm=2), echo(), policy="failover")
    assert chosen(st, one, NOW).order[0] == 0
    assert chosen(st, two, NOW + 1).order[0] == 0
    # key work has had its 2 requests of the minute, whichever balancer sent them
    assert [chosen(st, b, NOW + 2).order[0] for b in (one, two)] == [1, 1]
    assert st.stats(two, now=NOW + 2)[0]["limits"] == {"rpm": {"used": 2, "limit": 2}}
    assert chosen(st, two, NOW + 61).order[0] == 0  # a minute later, room again


def test_the_strictest_limit_given_for_a_key_applies_to_every_member_using_it(backend):
    strict, st = backend.open("strict", echo(key="work", rpm=2), echo(), policy="failover")
    loose = backend.balancer("loose", echo(key="work", rpm=5), echo(), policy="failover")
    free = backend.balancer("free", echo(key="work"), echo(), policy="failover")
    assert chosen(st, strict, NOW).order[0] == 0  # rpm=2 is declared for key work
    assert [chosen(st, b, NOW + 1).order[0] for b in (loose, free)] == [0, 1]
    assert chosen(st, loose, NOW + 2).order[0] == 1  # 2 in the minute: rpm=2 applies to all
    # and llm lb stats shows the limit that applies, not the member's own
    for balancer in (loose, free):
        assert st.stats(balancer, now=NOW + 2)[0]["limits"] == {"rpm": {"used": 2, "limit": 2}}
    assert st.claim(free, 0, now=NOW + 3) is False
    # the same model with another key, or another model with the key, is another bucket
    other = backend.balancer("other", echo(key="personal", rpm=5), echo())
    assert chosen(st, other, NOW + 4).order[0] == 0


def test_a_limit_applies_to_every_member_using_the_key_from_when_it_is_declared(backend):
    strict, st = backend.open("strict", echo(), echo(key="work", rpm=1), policy="failover")
    free = backend.balancer("free", echo(key="work"), echo(), policy="failover")
    st.declare(strict, now=NOW)  # llm lb save strict: before any prompt of lb:strict
    assert [chosen(st, free, NOW + step).order[0] for step in (1, 2)] == [0, 1]
    st.reset(strict)  # llm lb reset strict: its limit still applies while it is saved
    assert chosen(st, free, NOW + 3).order[0] == 1
    store.remove("strict", strict)  # llm lb remove strict: no longer
    assert chosen(st, free, NOW + 4).order[0] == 0
    st.declare(strict, now=NOW + 5)
    # not renewed for a day (no process used lb:strict), the declaration is forgotten
    assert [chosen(st, free, NOW + 5 + DAY + step).order[0] for step in (1, 2)] == [0, 0]


def test_a_new_definition_of_a_balancer_keeps_the_keys_windows(backend):
    old, st = backend.open("again", echo(key="work", rpm=2), echo(), policy="failover")
    assert [chosen(st, old, NOW + step).order[0] for step in (0, 1, 2)] == [0, 0, 1]
    # saved again with member 2's options changed: key work has had its 2 requests all the same
    new = backend.balancer(
        "again", echo(key="work", rpm=2), echo(options={"example_bool": True}), policy="failover"
    )
    assert [chosen(st, new, NOW + step).order[0] for step in (3, 4)] == [1, 1]
    assert st.stats(new, now=NOW + 4)[0]["limits"] == {"rpm": {"used": 2, "limit": 2}}
    store.saved(new, old)  # llm lb save --force: the old definition's rows are forgotten
    assert chosen(st, new, NOW + 5).order[0] == 1
    assert chosen(st, new, NOW + 61).order[0] == 0


def test_a_process_holding_an_older_definition_and_one_holding_the_new_never_reset_each_other(
    backend,
):
    member = echo(key="work", rpm=2)
    old, st = backend.open("long", member, echo(), echo())
    new = backend.balancer("long", member, echo(), echo(), echo())  # saved since with 4 members
    orders = []
    for step in range(10):  # a long-running llm chat, and new llm processes, in turn
        for balancer in (old, new):
            orders.append(chosen(st, balancer, NOW + step).order[0])
    assert orders.count(0) == 2  # key work received 2 requests in the minute, not 20
    # each keeps its own rotation and statistics (a look records only member 1's answers)
    assert [m["requests"] for m in st.stats(old, now=NOW + 10)] == [1, 0, 0]
    assert [m["requests"] for m in st.stats(new, now=NOW + 10)] == [1, 0, 0, 0]
    assert orders[0::2] == [0, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    assert orders[1::2] == [0, 1, 2, 3, 1, 2, 3, 1, 2, 3]


# --- one shared probe when a cooldown ends (issue 22) -------------------------------------------


def test_when_a_cooldown_ends_one_prompt_probes_the_member_and_the_others_go_elsewhere(backend):
    balancer, st = backend.open("probe", echo(), echo(), policy="failover")
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, failed(cooldown=30.0), now=NOW)
    probe = st.choose(balancer, now=NOW + 31)  # its cooldown ended: this prompt probes it
    assert probe.plan.order[0] == 0 and probe.ticket.probe and probe.ticket.leased
    assert probe.plan.why == "the first listed, its probe after a cooldown"
    for step in range(2, 5):  # in any process, until the probe ends
        assert st.choose(balancer, now=NOW + 30 + step).plan.order == (1,)
    assert st.claim(balancer, 0, now=NOW + 35) is False  # nor by failing over
    stats = st.stats(balancer, now=NOW + 35)[0]
    assert stats["cooling_down_for"] == "being probed; 500 server error"
    st.record(balancer, 0, Outcome(cooled=True), ticket=probe.ticket, now=NOW + 36)
    assert st.choose(balancer, now=NOW + 37).plan.order[0] == 0  # back in full use
    assert st.choose(balancer, now=NOW + 37).ticket is None  # no probe: nothing on record


def test_a_probe_that_fails_doubles_the_cooldown_and_one_that_dies_frees_the_member(backend):
    balancer, st = backend.open("probe2", echo(), echo(), policy="failover")
    st.record(balancer, 0, failed(cooldown=30.0), now=NOW)
    probe = st.choose(balancer, now=NOW + 31)
    st.record(balancer, 0, failed(cooldown=30.0), ticket=probe.ticket, now=NOW + 32)
    assert st.choose(balancer, now=NOW + 32 + 59).plan.order[0] == 1  # 60 s now
    dying = st.choose(balancer, now=NOW + 32 + 61)
    assert dying.plan.order[0] == 0 and dying.ticket.probe
    st.renew(balancer, 0, dying.ticket, now=NOW + 93 + 40)  # its process still runs
    assert st.choose(balancer, now=NOW + 93 + 80).plan.order == (1,)
    # then its process died: no renewal; its lease ends, and the next prompt probes again
    again = st.choose(balancer, now=NOW + 93 + 40 + rules.LEASE + 1)
    assert again.plan.order[0] == 0 and again.ticket.probe


def test_a_probe_by_failover_that_answers_clears_the_cooldown(backend):
    balancer, st = backend.open("probe3", echo(), echo())
    st.record(balancer, 1, failed(cooldown=30.0), now=NOW)
    # a prompt chosen before member 2 cooled down fails over to it after: its probe
    probe = st.claim(balancer, 1, now=NOW + 31)
    assert probe.probe
    st.record(balancer, 1, Outcome(cooled=False), ticket=probe, now=NOW + 32)
    assert st.stats(balancer, now=NOW + 32)[1]["cooling_down_until"] is None
    assert st.claim(balancer, 1, now=NOW + 33) is None  # in full use: nothing to probe


def test_a_probe_that_ends_with_no_verdict_leaves_the_member_due_again_at_once(backend):
    balancer, st = backend.open("probe4", echo(), echo(), policy="failover")
    st.record(balancer, 0, failed(cooldown=30.0), now=NOW)
    probe = st.choose(balancer, now=NOW + 31).ticket
    st.record(balancer, 0, failed("400 bad request: x", cooldown=None), ticket=probe, now=NOW + 32)
    again = st.choose(balancer, now=NOW + 33)  # the prompt's own fault: probe again
    assert again.plan.order[0] == 0 and again.ticket.probe
    st.finish(balancer, 0, again.ticket, now=NOW + 34)  # stopped before its answer
    assert st.choose(balancer, now=NOW + 35).ticket.probe


def test_with_nowhere_else_to_go_a_prompt_looks_again_shortly_while_a_probe_runs(backend):
    balancer, st = backend.open("probe5", echo())
    st.record(balancer, 0, failed(cooldown=30.0), now=NOW)
    assert st.choose(balancer, now=NOW + 31).ticket.probe
    waiting = st.choose(balancer, now=NOW + 31.5)
    assert (waiting.plan.order, waiting.plan.wait) == ((), (NOW + 32.5, 0))


# --- tiers -------------------------------------------------------------------------------------


def test_a_higher_tier_is_used_only_while_no_lower_member_has_room(backend):
    balancer, st = backend.open("tiers", echo(rpm=2), echo(rpm=2), echo(tier=2))
    firsts = [chosen(st, balancer, NOW + step).order[0] for step in range(10)]
    assert firsts == [0, 1, 0, 1, 2, 2, 2, 2, 2, 2]  # 2, 2 and 6, as issue 22 asks
    assert chosen(st, balancer, NOW + 61).order[0] == 0  # room again: back to tier 1


# --- cooldowns -------------------------------------------------------------------------------


def test_a_stated_cooldown_blocks_the_member_and_is_waited_for(backend):
    balancer, st = backend.open("ra", echo(), echo())
    assert st.choose(balancer, now=NOW).plan.order[0] == 0
    st.record(balancer, 0, failed("429 rate limited: slow down", 100, stated=True), now=NOW)
    choice = st.choose(balancer, now=NOW + 1)
    assert (choice.plan.order, choice.plan.skipped) == ((1,), ())  # not even tried last
    assert choice.cooled == frozenset({0})
    st.record(balancer, 1, failed("429 rate limited: later", 50, stated=True), now=NOW + 1)
    waiting = st.choose(balancer, now=NOW + 2).plan
    assert (waiting.order, waiting.wait) == ((), (NOW + 51, 1))
    assert st.choose(balancer, now=NOW + 51).plan.order == (1,)
    assert st.choose(balancer, now=NOW + 100).plan.order == (0, 1)


def test_a_guessed_cooldown_skips_the_member_only_while_others_are_available(backend):
    balancer, st = backend.open("cd", echo(), echo(), echo())
    assert st.choose(balancer, now=NOW).plan.order[0] == 0
    st.record(balancer, 0, failed(cooldown=30), now=NOW)
    plan = st.choose(balancer, now=NOW + 1).plan
    assert (plan.order, plan.skipped) == ((1, 2), (0,))
    st.record(balancer, 1, failed(cooldown=10), now=NOW + 1)
    st.record(balancer, 2, failed(cooldown=60), now=NOW + 1)
    everyone = st.choose(balancer, now=NOW + 2).plan  # all cooling down: the soonest first
    assert (everyone.order, everyone.skipped, everyone.wait) == ((1, 0, 2), (), None)
    later = st.choose(balancer, now=NOW + 30).plan  # member 1's and 2's have ended
    assert (later.order, later.skipped) == ((0, 1), (2,))


def test_a_member_that_fails_again_after_its_cooldown_cools_down_twice_as_long(backend):
    balancer, st = backend.open("esc", echo(), echo())
    st.choose(balancer, now=NOW)
    lengths = []
    now = NOW
    for _ in range(4):
        st.record(balancer, 0, failed(cooldown=30), now=now)
        until = st.stats(balancer, now=now)[0]["cooling_down_until"]
        lengths.append(until - now)
        now = until + 1  # it fails again right after its cooldown ended
    assert lengths == [30, 60, 120, 240]
    st.record(balancer, 0, Outcome(), now=now)  # a success resets it
    st.record(balancer, 0, failed(cooldown=30), now=now + 1)
    assert st.stats(balancer, now=now + 1)[0]["cooling_down_until"] == now + 31
    for _ in range(20):
        st.record(balancer, 0, failed(cooldown=30), now=now)
    assert st.stats(balancer, now=now)[0]["cooling_down_until"] == now + config.MAX_SECONDS


def test_a_quota_cooldown_says_what_it_is_for(backend):
    balancer, st = backend.open("q", echo(), echo())
    st.choose(balancer, now=NOW)
    error = "429 quota exhausted: insufficient_quota"
    st.record(balancer, 0, failed(error, 3600, stated=True), now=NOW)
    member = st.stats(balancer, now=NOW + 1)[0]
    assert member["cooling_down_for"] == "429 quota exhausted"
    assert member["cooling_down_until"] == NOW + 3600
    assert member["last_error"] == error
    assert [st.choose(balancer, now=NOW + s).plan.order for s in (2, 3)] == [(1,), (1,)]
    ended = st.stats(balancer, now=NOW + 3600)[0]
    assert (ended["cooling_down_until"], ended["cooling_down_for"]) == (None, None)


def test_a_reset_the_provider_stated_lasts_as_stated_up_to_a_week_never_doubled(backend):
    balancer, st = backend.open("stated", echo(), echo())
    st.choose(balancer, now=NOW)
    error = "429 quota exhausted, reset in 3d stated by the provider in retry-after: spent"
    st.record(balancer, 0, failed(error, 3 * DAY, stated=True, exact=True), now=NOW)
    member = st.stats(balancer, now=NOW + 1)[0]
    assert member["cooling_down_until"] == NOW + 3 * DAY  # past a day: as stated
    assert member["cooling_down_for"] == error.split(":")[0]
    assert st.choose(balancer, now=NOW + 2 * DAY).plan.order == (1,)
    assert st.claim(balancer, 0, now=NOW + 2 * DAY) is False  # known to be refused
    assert 0 in st.choose(balancer, now=NOW + 3 * DAY + 1).plan.order
    # stated again right after: as stated, not twice the last; a month is a week
    st.record(balancer, 0, failed(error, 10.0, stated=True, exact=True), now=NOW + 3 * DAY + 2)
    assert st.stats(balancer, now=NOW + 3 * DAY + 2)[0]["cooling_down_until"] == (
        NOW + 3 * DAY + 12
    )
    st.record(balancer, 0, failed(error, 30 * DAY, stated=True, exact=True), now=NOW + 4 * DAY)
    until = st.stats(balancer, now=NOW + 4 * DAY)[0]["cooling_down_until"]
    assert until == NOW + 4 * DAY + config.MAX_STATED_SECONDS
    # a Retry-After on a 5xx, or quota_cooldown, still doubles when it comes right back
    st.record(balancer, 1, failed(cooldown=20, stated=True), now=NOW + 5 * DAY)
    st.record(balancer, 1, failed(cooldown=20, stated=True), now=NOW + 5 * DAY + 21)
    assert st.stats(balancer, now=NOW + 5 * DAY + 21)[1]["cooling_down_until"] == (
        NOW + 5 * DAY + 21 + 40
    )


def test_a_cooldown_recorded_while_the_clock_ran_ahead_lasts_its_own_length(backend):
    balancer, st = backend.open("ahead", echo(), echo())
    st.record(balancer, 0, failed(cooldown=30), now=NOW + 10 * DAY)  # the clock 10 days ahead
    # the clock is right again: llm lb stats says 30 s from now, before any prompt
    assert st.stats(balancer, now=NOW)[0]["cooling_down_until"] == pytest.approx(NOW + 30)
    back = st.choose(balancer, now=NOW)
    assert back.plan.skipped == (0,)  # cooling down: for 30 s from now, not 10 days
    assert st.stats(balancer, now=NOW)[0]["cooling_down_until"] == pytest.approx(NOW + 30)
    after = st.choose(balancer, now=NOW + 31)
    assert after.plan.skipped == ()
    first = after.plan.order[0]  # (member 1's probe, or member 2: either answers)
    st.record(balancer, first, Outcome(cooled=True), ticket=after.ticket, now=NOW + 31)
    # a stated reset the same: its own length from now at most
    st.record(balancer, 1, failed("429 rate limited: x", 100, stated=True), now=NOW + 10 * DAY)
    assert st.choose(balancer, now=NOW + 40).plan.order == (0,)
    probe = st.claim(balancer, 1, now=NOW + 141)  # ended: the member may be asked again
    assert probe not in (None, False) and probe.probe  # (its probe)


def test_a_success_clears_the_cooldown_on_record(backend):
    balancer, st = backend.open("clear", echo(), echo())
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, failed(cooldown=30), now=NOW)
    assert st.choose(balancer, now=NOW + 1).cooled == frozenset({0})
    # a success while it cools down (a prompt that started before): asked again at once
    st.record(balancer, 0, Outcome(), now=NOW + 2)
    choice = st.choose(balancer, now=NOW + 3)
    assert (choice.plan.skipped, choice.cooled) == ((), frozenset())
    assert st.stats(balancer, now=NOW + 3)[0]["cooling_down_until"] is None
    # one that ended stays on record (a failure after it lasts twice as long) until a success
    st.record(balancer, 0, failed(cooldown=30), now=NOW + 4)
    assert st.choose(balancer, now=NOW + 40).cooled == frozenset({0})
    st.record(balancer, 0, Outcome(), now=NOW + 41)
    assert st.choose(balancer, now=NOW + 42).cooled == frozenset()
    st.record(balancer, 0, failed(cooldown=30), now=NOW + 43)
    assert st.stats(balancer, now=NOW + 43)[0]["cooling_down_until"] == NOW + 73  # not 60


# --- prompts in flight (least-busy) ----------------------------------------------------------


def in_flight(plan) -> str:
    "The prompts in flight per member that a least-busy plan was chosen by: '1: 0, 2: 1'."
    prefix = "least busy (in flight by member: "
    assert plan.why.startswith(prefix) and plan.why.endswith(")"), plan.why
    return plan.why[len(prefix) : -1]


def test_prompts_in_flight_count_for_least_busy_until_recorded_or_finished(backend):
    balancer, st = backend.open("busy", echo(), echo(), echo(), policy="least-busy")
    choices = [st.choose(balancer, now=NOW + step) for step in range(4)]
    assert [c.plan.order[0] for c in choices] == [0, 1, 2, 0]
    assert in_flight(choices[1].plan) == "1: 1, 2: 0, 3: 0"
    assert in_flight(choices[3].plan) == "1: 1, 2: 1, 3: 1"
    st.record(balancer, 0, Outcome(), ticket=choices[0].ticket, now=NOW + 4)  # answered
    st.finish(balancer, 1, choices[1].ticket, now=NOW + 4)  # the caller stopped reading
    after = st.choose(balancer, now=NOW + 5).plan
    assert after.order[0] == 1 and in_flight(after) == "1: 1, 2: 0, 3: 1"


def test_prompts_in_flight_in_one_process_count_in_another(backend):
    balancer = backend.balancer("busy", echo(), echo(), policy="least-busy")
    mine = backend.store(balancer)
    first = mine.choose(balancer, now=NOW)  # member 1, in flight in this process
    assert first.plan.order[0] == 0
    store.new_process()
    other = backend.store(balancer)
    seen = other.choose(balancer, now=NOW + 1)
    assert seen.plan.order[0] == 1 and in_flight(seen.plan) == "1: 1, 2: 0"
    other.record(balancer, 1, Outcome(), ticket=seen.ticket, now=NOW + 2)
    mine.record(balancer, 0, Outcome(), ticket=first.ticket, now=NOW + 2)  # nothing in flight
    assert in_flight(other.choose(balancer, now=NOW + 3).plan) == "1: 0, 2: 0"


def test_a_prompt_in_flight_still_ends_after_the_clock_stepped_back(backend):
    balancer, st = backend.open("busy", echo(), echo(), policy="least-busy")
    only_first = frozenset({1})  # both prompts go to member 1, the second after a step back
    first = st.choose(balancer, now=NOW, unavailable=only_first)
    second = st.choose(balancer, now=NOW - 30, unavailable=only_first)
    st.record(balancer, 0, Outcome(), ticket=first.ticket, now=NOW - 25)
    st.record(balancer, 0, Outcome(), ticket=second.ticket, now=NOW - 20)
    # neither is in flight any more: least-busy goes on in rotation
    assert [chosen(st, balancer, NOW - 10 + step).order[0] for step in range(4)] == [1, 0, 1, 0]


def test_a_prompt_in_flight_counts_while_its_lease_is_renewed(backend):
    balancer, st = backend.open("busy", echo(), echo(), policy="least-busy")
    kept = st.choose(balancer, now=NOW)  # member 1: its process renews its lease
    gone = st.choose(balancer, now=NOW + 1)  # member 2: its process died, renewing nothing
    assert (kept.plan.order[0], in_flight(gone.plan)) == (0, "1: 1, 2: 0")
    st.renew(balancer, 0, kept.ticket, now=NOW + rules.RENEW)
    st.renew(balancer, 0, kept.ticket, now=NOW + 2 * rules.RENEW)
    # (each look is a prompt that ends at once: it leaves nothing in flight)
    assert in_flight(chosen(st, balancer, NOW + rules.LEASE)) == "1: 1, 2: 1"
    # member 2's lease ended: a dead process's prompt stops counting within a lease, whatever
    # became of its process id and wherever it ran
    assert in_flight(chosen(st, balancer, NOW + 1 + rules.LEASE + 0.5)) == "1: 1, 2: 0"
    assert in_flight(chosen(st, balancer, NOW + 2 * rules.RENEW + rules.LEASE)) == "1: 0, 2: 0"


def test_a_lease_renewed_while_the_clock_ran_ahead_stops_counting_once_it_is_back(backend):
    balancer, st = backend.open("ahead", echo(), echo(), policy="least-busy")
    choice = st.choose(balancer, now=NOW)
    st.renew(balancer, 0, choice.ticket, now=NOW + 10 * DAY)  # the clock ran 10 days ahead
    # back on time, a lease ending in 10 days was not written by this clock: it does not count
    assert in_flight(chosen(st, balancer, NOW + 1)) == "1: 0, 2: 0"


def test_prompts_in_flight_longer_than_an_hour_stop_counting(backend):
    balancer, st = backend.open("stale", echo(), echo(), policy="least-busy")
    hour = rules.IN_FLIGHT_HOURS * 3600
    choice = st.choose(balancer, now=NOW)
    assert choice.plan.order[0] == 0
    st.renew(balancer, 0, choice.ticket, now=NOW + hour - 10)
    assert in_flight(chosen(st, balancer, NOW + hour - 1)) == "1: 1, 2: 0"
    assert in_flight(chosen(st, balancer, NOW + hour)) == "1: 0, 2: 0"


def test_a_prompt_in_flight_across_a_reset_is_counted_and_ends_no_other(backend):
    balancer, st = backend.open("z", echo(), echo(), policy="least-busy")
    before = st.choose(balancer, now=NOW)
    st.reset(balancer)
    since = st.choose(balancer, now=NOW + 1).plan  # nothing in flight after the reset
    assert since.order[0] == 0 and in_flight(since) == "1: 0, 2: 0"
    st.record(balancer, 0, Outcome(tokens_in=5, tokens_out=5), ticket=before.ticket, now=NOW + 2)
    member = st.stats(balancer, now=NOW + 2)[0]
    assert (member["requests"], member["input_tokens"]) == (1, 5)
    # its outcome does not end the prompt chosen since the reset
    assert in_flight(st.choose(balancer, now=NOW + 3).plan) == "1: 1, 2: 0"


def test_a_prompt_in_flight_across_a_reset_keeps_its_outcome_and_hides_no_request(backend):
    balancer, st = backend.open("z", echo(rpm=3), echo(), policy="failover")
    in_flight = st.choose(balancer, now=NOW).ticket
    st.reset(balancer)
    for moment in (NOW + 1, NOW + 2):  # the key's window still holds the first request
        assert st.choose(balancer, now=moment).plan.order[0] == 0
    st.record(balancer, 0, Outcome(tokens_in=5, tokens_out=5), ticket=in_flight, now=NOW + 3)
    assert st.stats(balancer, now=NOW + 3)[0]["input_tokens"] == 5
    # its outcome does not hide the two requests counted since the reset
    assert st.choose(balancer, now=NOW + 4).plan.order[0] == 1


# --- timings (lowest-latency) ----------------------------------------------------------------


class NeverExplore:
    "An rng under which lowest-latency never goes in rotation order to explore."

    def random(self):
        return 0.99


def timed(first_chunk, total, streamed=True):
    return Outcome(first_chunk=first_chunk, total=total, streamed=streamed)


def test_lowest_latency_puts_the_fastest_recent_member_first(backend):
    balancer, st = backend.open("fast", echo(), echo(), echo(), policy="lowest-latency")
    fresh = st.choose(balancer, rng=NeverExplore(), now=NOW).plan
    assert (fresh.order, fresh.why) == ((0, 1, 2), "no recent timing yet")
    st.record(balancer, 0, timed(0.5, 1.0), now=NOW)
    st.record(balancer, 1, timed(0.125, 0.5), now=NOW)
    st.record(balancer, 1, timed(0.25, 0.5), now=NOW + 1)
    st.record(balancer, 1, timed(0.375, 0.5), now=NOW + 2)
    # a member without a timing goes first, then the fastest (member 2: median 250 ms)
    assert st.choose(balancer, rng=NeverExplore(), now=NOW + 3).plan.order == (2, 1, 0)
    st.record(balancer, 2, timed(0.3, 0.5), now=NOW + 3)
    plan = st.choose(balancer, rng=NeverExplore(), now=NOW + 4).plan
    assert (plan.order, plan.why) == ((1, 2, 0), "lowest recent latency (250 ms)")


def test_lowest_latency_judges_streaming_and_other_prompts_by_their_own_timings(backend):
    balancer, st = backend.open("kinds", echo(), echo(), policy="lowest-latency")
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, timed(0.125, 2.0), now=NOW)  # fast to start, slow to end
    st.record(balancer, 1, timed(0.5, 0.75), now=NOW)
    assert st.choose(balancer, stream=True, rng=NeverExplore(), now=NOW + 1).plan.order == (0, 1)
    unknown = st.choose(balancer, stream=False, rng=NeverExplore(), now=NOW + 2).plan
    assert unknown.why == "no recent timing yet"  # no prompt without streaming timed yet
    st.record(balancer, 0, timed(None, 2.0, streamed=False), now=NOW + 3)
    st.record(balancer, 1, timed(None, 0.75, streamed=False), now=NOW + 3)
    assert st.choose(balancer, stream=False, rng=NeverExplore(), now=NOW + 4).plan.order == (1, 0)
    assert st.choose(balancer, stream=True, rng=NeverExplore(), now=NOW + 5).plan.order == (0, 1)


def test_timings_older_than_an_hour_no_longer_judge_a_member(backend):
    balancer, st = backend.open("old", echo(), echo(), policy="lowest-latency")
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, timed(2.0, 3.0), now=NOW)
    st.record(balancer, 1, timed(0.125, 1.0), now=NOW + 10)
    hour = rules.RECENT_HOURS * 3600
    assert st.choose(balancer, rng=NeverExplore(), now=NOW + hour - 1).plan.order == (1, 0)
    # member 1's timing is recent, member 0's is not: member 0 has none, and goes first
    plan = st.choose(balancer, rng=NeverExplore(), now=NOW + hour).plan
    assert (plan.order[0], plan.why) == (0, "no recent timing yet")


# --- conversations ---------------------------------------------------------------------------


def test_a_sticky_conversation_keeps_its_first_member(backend):
    balancer, st = backend.open("sticky", echo(), echo(), echo(), sticky=True)
    assert st.choose(balancer, conversation="talk", now=NOW).plan.order[0] == 0
    st.record(balancer, 0, Outcome(conversation="talk"), now=NOW)
    assert st.choose(balancer, now=NOW + 1).plan.order[0] == 1  # other prompts move on
    plan = st.choose(balancer, conversation="talk", now=NOW + 2).plan
    assert (plan.order, plan.why) == ((0, 2, 1), "the conversation's member")
    assert st.choose(balancer, now=NOW + 3).plan.order[0] == 2  # the rotation did not move
    # another member answered one turn (a failover): the first member is kept ...
    st.record(balancer, 2, Outcome(conversation="talk"), now=NOW + 4)
    assert st.choose(balancer, conversation="talk", now=NOW + 5).plan.order[0] == 0
    # ... but a tool turn goes back to the member that made the tool calls
    tools = st.choose(balancer, conversation="talk", tool_turn=True, now=NOW + 6).plan
    assert tools.order == (2,)
    # a member cooling down is not preferred
    st.record(balancer, 0, failed(cooldown=30), now=NOW + 7)
    cooling = st.choose(balancer, conversation="talk", now=NOW + 8).plan
    assert cooling.order[0] != 0 and cooling.skipped == (0,)
    # a failure ties nothing
    st.record(balancer, 1, Outcome(error="500 server error: x", conversation="other"), now=NOW + 9)
    assert st.choose(balancer, conversation="other", now=NOW + 10).plan.why == "rotation"


def test_a_tool_turn_goes_back_to_the_member_that_made_the_tool_calls(backend):
    balancer, st = backend.open("tools", echo(), echo(), echo())  # not sticky
    for step, member in enumerate((0, 1)):
        assert st.choose(balancer, conversation="c", now=NOW + step).plan.order[0] == member
        st.record(balancer, member, Outcome(conversation="c"), now=NOW + step)
    plan = st.choose(balancer, conversation="c", tool_turn=True, now=NOW + 2).plan
    assert plan.order == (1,)  # the last member, alone
    assert st.choose(balancer, now=NOW + 3).plan.order[0] == 2  # the rotation did not move
    # cooling down after a guessed time, it is still the one to answer
    st.record(balancer, 1, failed(cooldown=30), now=NOW + 4)
    assert st.choose(balancer, conversation="c", tool_turn=True, now=NOW + 5).plan.order == (1,)
    # inside a stated reset, it is waited for
    st.record(balancer, 1, failed("429 rate limited: x", 100, stated=True), now=NOW + 6)
    waiting = st.choose(balancer, conversation="c", tool_turn=True, now=NOW + 7).plan
    assert (waiting.order, waiting.wait) == ((), (NOW + 106, 1))


def test_ties_unused_for_30_days_are_forgotten(backend):
    balancer, st = backend.open("t", echo(), echo())
    st.choose(balancer, now=NOW)
    st.record(balancer, 1, Outcome(conversation="old"), now=NOW)
    st.record(balancer, 1, Outcome(conversation="recent"), now=NOW + 2 * DAY)
    later = NOW + (rules.KEEP_DAYS + 1) * DAY  # 31 days after "old", 29 after "recent"

    def tied(conversation):
        plan = st.choose(balancer, conversation=conversation, tool_turn=True, now=later).plan
        return plan.order == (1,)

    # the SQLite file forgets them at random, one record in PRUNE_EVERY (seeded here)
    # (a Redis server at the first tie recorded after it: it deletes the ties that are too old)
    random.seed(5)
    for count in range(1, 50 * sqlite_store.PRUNE_EVERY):
        st.record(balancer, 0, Outcome(conversation="new"), now=later)
        if not tied("old"):
            break
    else:
        pytest.fail("the tie unused for 31 days was never forgotten")
    if backend.kind == "sqlite":
        assert count > 1  # not at once: the tie was there until a record pruned it
    assert tied("recent")
    assert st.choose(balancer, conversation="new", tool_turn=True, now=later).plan.order == (0,)


# --- reset, remove, a new definition ---------------------------------------------------------


def test_a_reset_forgets_rotation_cooldowns_ties_and_statistics_not_the_keys_windows(backend):
    balancer, st = backend.open("r", echo(rpm=5), echo(), echo(), sticky=True)
    first = st.choose(balancer, now=NOW)
    st.record(balancer, 0, Outcome(tokens_in=3), ticket=first.ticket, now=NOW)
    st.record(balancer, 1, failed("429 rate limited: x", 100, stated=True), now=NOW)
    st.record(balancer, 2, Outcome(conversation="c"), now=NOW)
    assert st.choose(balancer, conversation="c", now=NOW + 1).plan.order[0] == 2
    st.reset(balancer)
    choice = st.choose(balancer, conversation="c", now=NOW + 2)
    assert (choice.plan.order, choice.plan.why) == ((0, 1, 2), "rotation")
    assert choice.cooled == frozenset()
    members = st.stats(balancer, now=NOW + 2)
    assert [m["requests"] for m in members] == [0, 0, 0]
    # the key received both requests: they still count against its limit
    assert members[0]["limits"] == {"rpm": {"used": 2, "limit": 5}}
    assert [m["cooling_down_until"] for m in members] == [None] * 3
    assert [m["last_used"] for m in members] == [None] * 3


def test_remove_forgets_the_state_kept_under_the_name(backend):
    balancer, st = backend.open("gone", echo(), echo())
    st.choose(balancer, now=NOW)
    st.record(balancer, 0, failed(cooldown=300), now=NOW)
    store.remove("gone", balancer)
    members = st.stats(balancer, now=NOW + 1)
    assert [(m["requests"], m["cooling_down_until"]) for m in members] == [(0, None)] * 2
    choice = st.choose(balancer, now=NOW + 1)
    assert (choice.plan.order, choice.cooled) == ((0, 1), frozenset())


def test_a_new_definition_of_a_name_starts_afresh(backend):
    old, st = backend.open("again", echo(), echo(weight=2))
    st.choose(old, now=NOW)
    st.record(old, 1, failed(cooldown=300), now=NOW)
    st.record(old, 0, Outcome(tokens_in=4), now=NOW)
    new = backend.balancer("again", echo(), echo(rpm=5), echo())
    choice = st.choose(new, now=NOW + 1)
    assert choice.plan.order[0] == 0  # the rotation starts again
    assert choice.plan.skipped == ()  # member 2 of this definition never failed
    assert choice.cooled == frozenset()
    assert [st.choose(new, now=NOW + 1).plan.order[0] for _ in range(2)] == [1, 2]
    assert [m["requests"] for m in st.stats(new, now=NOW + 1)] == [0, 0, 0]


# --- statistics ------------------------------------------------------------------------------


def test_statistics_of_each_member(backend):
    balancer, st = backend.open("s", echo(rpm=10, tpm=1000), echo(), echo())
    choice = st.choose(balancer, now=NOW)  # member 1, its request counted
    answer = Outcome(tokens_in=12.0, tokens_out=3, first_chunk=0.25, total=1.0)  # a float count
    st.record(balancer, 0, answer, ticket=choice.ticket, now=NOW)
    assert st.choose(balancer, now=NOW + 1).plan.order[0] == 1
    failure = Outcome(error="500 server error: boom", cooldown=30, total=0.5)
    st.record(balancer, 1, failure, now=NOW + 1)
    third = Outcome(tokens_in=1, tokens_out=2, first_chunk=0.75, total=3.0)
    st.record(balancer, 0, third, now=NOW + 2)
    st.record(balancer, 0, Outcome(items=7), now=NOW + 3)  # an embedding batch of 7 items
    first, second, third = st.stats(balancer, now=NOW + 4)
    assert first == {
        "member": 1,
        "requests": 3,
        "successes": 3,
        "failures": 0,
        "share": 0.75,
        "input_tokens": 13,
        "output_tokens": 5,
        "items": 7,
        "first_chunk": {"median": 0.5, "p95": 0.75},
        "total_time": {"median": 2.0, "p95": 3.0},
        "limits": {
            "rpm": {"used": 1, "limit": 10},
            "tpm": {"used": 18, "limit": 1000, "reserved": 0},
        },
        "last_used": NOW + 3,
        "last_error": None,
        "cooling_down_until": None,
        "cooling_down_for": None,
    }
    assert second == {
        "member": 2,
        "requests": 1,
        "successes": 0,
        "failures": 1,
        "share": 0.25,
        "input_tokens": 0,
        "output_tokens": 0,
        "items": 0,
        "first_chunk": None,
        "total_time": {"median": 0.5, "p95": 0.5},
        "limits": {},
        "last_used": NOW + 1,
        "last_error": "500 server error: boom",
        "cooling_down_until": NOW + 31,
        "cooling_down_for": "500 server error",
    }
    assert third == {
        "member": 3,
        "requests": 0,
        "successes": 0,
        "failures": 0,
        "share": 0.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "items": 0,
        "first_chunk": None,
        "total_time": None,
        "limits": {},
        "last_used": None,
        "last_error": None,
        "cooling_down_until": None,
        "cooling_down_for": None,
    }
    # limits now: the window has moved on
    assert st.stats(balancer, now=NOW + 61)[0]["limits"] == {
        "rpm": {"used": 0, "limit": 10},
        "tpm": {"used": 3, "limit": 1000, "reserved": 0},
    }


def test_last_used_and_last_error_are_those_of_the_attempt_that_ended_last(backend):
    balancer, st = backend.open("ended", echo(rpm=100), echo(), policy="failover")
    long_one = st.choose(balancer, now=NOW).ticket
    short_one = st.choose(balancer, now=NOW + 1).ticket
    st.record(balancer, 0, failed("500 server error: short", None), ticket=short_one, now=NOW + 2)
    st.record(balancer, 0, failed("429 rate limited: long", None), ticket=long_one, now=NOW + 60)
    member = st.stats(balancer, now=NOW + 61)[0]
    assert (member["last_used"], member["last_error"]) == (NOW + 60, "429 rate limited: long")
