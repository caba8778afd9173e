"""Which member goes first: policy.plan and policy.schedule for every policy (cooldowns, pinned
and preferred members, weights, members at their limits), and the window arithmetic of limits
(issues 3, 10, 11). Pure functions, tested with an injected clock and seeded random generators;
what the state tells them is tested in test_store.py (every backend), the policies through
llm and a local server in test_policy_http.py."""

import random
from fractions import Fraction

import pytest
from conftest import NOW

from llm_loadbalancer import limits
from llm_loadbalancer.policy import BUILT_UP_TO, EXPLORE, plan, rotation, schedule

# --- roundrobin and failover: cooldowns, pinned and preferred members ------------------------


def test_roundrobin_starts_at_the_position_and_moves_on():
    result = plan("roundrobin", 3, 1, {}, NOW)
    assert result.order == (1, 2, 0)
    assert result.position == 2
    assert plan("roundrobin", 3, 2, {}, NOW).position == 0


def test_roundrobin_skips_members_cooling_down():
    result = plan("roundrobin", 3, 0, {0: NOW + 10}, NOW)
    assert result.order == (1, 2)
    assert result.skipped == (0,)
    assert result.position == 2
    # an ended cooldown no longer counts
    assert plan("roundrobin", 3, 0, {0: NOW - 1}, NOW).order == (0, 1, 2)


def test_every_member_cooling_down_is_still_tried_soonest_first():
    result = plan("roundrobin", 3, 0, {0: NOW + 30, 1: NOW + 5, 2: NOW + 10}, NOW)
    assert result.order == (1, 2, 0)
    assert result.skipped == ()


def test_failover_policy_always_starts_at_the_first_member():
    assert plan("failover", 3, 2, {}, NOW).order == (0, 1, 2)
    assert plan("failover", 3, 0, {0: NOW + 5}, NOW).order == (1, 2)
    # back to the primary once its cooldown is over
    assert plan("failover", 3, 0, {0: NOW - 5}, NOW).order == (0, 1, 2)


def test_pinned_member_answers_alone_and_the_rotation_stays():
    result = plan("roundrobin", 3, 0, {2: NOW + 10}, NOW, pinned=2)
    assert result.order == (2,)
    assert result.position == 0
    assert result.why == "the member that made the tool calls"  # what the debug line says


def test_preferred_member_goes_first_unless_cooling_down():
    result = plan("roundrobin", 3, 0, {}, NOW, preferred=2)
    assert result.order == (2, 0, 1)
    assert result.position == 0
    assert plan("roundrobin", 3, 0, {2: NOW + 1}, NOW, preferred=2).order == (0, 1)


# --- weights ---------------------------------------------------------------------------------


def test_smooth_weighted_round_robin_spreads_a_heavy_member_out():
    assert schedule((5, 1, 1)) == (0, 0, 1, 0, 2, 0, 0)  # a a b a c a a, never a a a a a b c
    assert schedule((3, 1)) == (0, 0, 1, 0)
    assert schedule((1, 1, 1)) == (0, 1, 2)  # equal weights: today's order


def test_weighted_rotation_goes_on_from_the_stored_position():
    order, position = [], 0
    for _ in range(14):
        result = plan("roundrobin", 3, position, {}, NOW, weights=(5, 1, 1))
        order.append("abc"[result.order[0]])
        position = result.position
    assert "".join(order) == "aabacaa" * 2


def firsts(weights, position, prompts):
    "The member each of so many prompts goes to, from a stored position, and the position after."
    chosen = []
    for _ in range(prompts):
        result = plan("roundrobin", len(weights), position, {}, NOW, weights=weights)
        chosen.append(result.order[0])
        position = result.position
    return chosen, position


def in_key_order(weights):
    """The cycle for totals above BUILT_UP_TO, enumerated: member j's k-th appearance has the key
    (2k + 1) / (2 * weight), appearances in key order, ties to the member listed first."""
    keyed = [(Fraction(2 * k + 1, 2 * w), j) for j, w in enumerate(weights) for k in range(w)]
    return [member for _, member in sorted(keyed)]


LARGE = [(70, 30, 1), (700, 300, 1), (1, 150), (40, 40, 40), (3, 97, 5, 64)]


@pytest.mark.parametrize("weights", LARGE)
def test_a_large_total_gives_each_member_exactly_its_weight_spread_out(weights):
    total = sum(weights)
    assert total > BUILT_UP_TO
    chosen, position = firsts(weights, 0, total)
    assert position == 0  # one whole cycle
    assert [chosen.count(member) for member in range(len(weights))] == list(weights)
    # spread out: between two turns of a member, about total / weight others (give or take one
    # per member), never a run of the heavy member and then the light ones
    for member, weight in enumerate(weights):
        turns = [slot for slot, first in enumerate(chosen) if first == member]
        gaps = [b - a for a, b in zip(turns, turns[1:] + [turns[0] + total])]
        assert max(gaps) <= total / weight + len(weights)


@pytest.mark.parametrize("weights", LARGE)
def test_a_large_total_follows_the_cycle_in_key_order_from_every_position(weights):
    cycle = in_key_order(weights)
    total = len(cycle)
    assert firsts(weights, 0, total)[0] == cycle
    for start in range(total):
        # every member in the order the cycle reaches it from start, and the slot where it does
        reached = {}
        for slot in [*range(start, total), *range(start)]:
            reached.setdefault(cycle[slot], slot)
        members, slot = rotation(weights, start)
        assert members == list(reached)
        assert {member: slot(member) for member in members} == reached


def test_small_totals_keep_nginx_order_up_to_the_threshold():
    weights = (BUILT_UP_TO - 2, 1, 1)  # as 5, 1, 1: nginx's order is not the key order
    assert firsts(weights, 0, BUILT_UP_TO)[0] == list(schedule(weights))
    assert schedule(weights) != tuple(in_key_order(weights))


def test_a_large_total_still_skips_cooling_blocked_and_unavailable_members():
    # slot 0 is member 0, slot 1 member 1; member 2 (weight 1) comes at slot 1,000,000,000
    weights = (10**9, 10**9, 1)
    result = plan("roundrobin", 3, 0, {0: NOW + 10}, NOW, weights=weights)
    assert (result.order, result.skipped, result.position) == ((1, 2), (0,), 2)
    result = plan("roundrobin", 3, 0, {0: NOW + 10, 1: NOW + 5}, NOW, weights=weights)
    assert (result.order, result.position) == ((2,), 10**9 + 1)
    result = plan("roundrobin", 3, 0, {}, NOW, weights=weights, unavailable=frozenset({0, 1}))
    assert (result.order, result.position) == ((2,), 10**9 + 1)
    cooling = {0: NOW + 30, 1: NOW + 5, 2: NOW + 10}
    result = plan("roundrobin", 3, 0, cooling, NOW, weights=weights)
    assert (result.order, result.skipped, result.position) == ((1, 2, 0), (), 2)
    result = plan("roundrobin", 3, 0, {}, NOW, weights=weights, blocked={0: NOW + 9, 1: NOW + 4})
    assert result.order == (2,) and result.wait is None
    result = plan("roundrobin", 3, 0, {}, NOW, weights=weights, blocked={2: NOW + 9}, pinned=2)
    assert result.order == () and result.wait == (NOW + 9, 2)


def test_weights_1_and_1_000_000_000_plan_without_building_the_cycle():
    weights = (1, 10**9)
    # member 0's one turn has the key 1/2: after the 500,000,000 of member 1's keys below it
    turn = 5 * 10**8
    chosen, position = firsts(weights, 0, 1000)
    assert chosen == [1] * 1000 and position == 1000
    chosen, position = firsts(weights, turn - 500, 1000)
    assert chosen == [1] * 500 + [0] + [1] * 499 and position == turn + 500
    # from anywhere in the cycle, member 0 is next reached at that one slot: it appears once
    for start in (0, turn, turn + 1, sum(weights) - 1):
        assert rotation(weights, start)[1](0) == turn
    assert plan("roundrobin", 2, sum(weights) - 1, {}, NOW, weights=weights).position == 0


# --- members at their limits -----------------------------------------------------------------


def test_a_member_at_its_limit_is_skipped_and_the_plan_waits_when_none_is_free():
    result = plan("roundrobin", 3, 0, {}, NOW, blocked={0: NOW + 20})
    assert result.order == (1, 2) and result.wait is None
    result = plan("roundrobin", 2, 0, {}, NOW, blocked={0: NOW + 20, 1: NOW + 5})
    assert result.order == () and result.wait == (NOW + 5, 1)


def test_guessed_cooldowns_are_still_tried_but_known_ones_are_waited_for():
    # member 0 cools down after a 500 (a guess); member 1 is inside a Retry-After (known)
    result = plan("roundrobin", 2, 0, {0: NOW + 30}, NOW, blocked={1: NOW + 10})
    assert result.order == (0,) and result.wait is None


def test_a_tool_turn_waits_for_its_member():
    result = plan("roundrobin", 2, 0, {}, NOW, pinned=1, blocked={1: NOW + 3})
    assert result.order == () and result.wait == (NOW + 3, 1)


# --- least-busy, lowest-latency and random ---------------------------------------------------


def test_least_busy_takes_the_member_with_fewest_prompts_in_flight():
    assert plan("least-busy", 3, 0, {}, NOW, busy={0: 2, 1: 0, 2: 1}).order == (1, 2, 0)
    # ties go in rotation order
    assert plan("least-busy", 3, 1, {}, NOW, busy={0: 1}).order[0] == 1
    assert plan("least-busy", 3, 2, {}, NOW, busy={}).order[0] == 2


def test_least_busy_still_skips_members_cooling_down_and_at_their_limits():
    result = plan("least-busy", 3, 0, {1: NOW + 5}, NOW, busy={0: 3}, blocked={2: NOW + 9})
    assert result.order == (0,)


def test_lowest_latency_tries_members_without_timings_first_then_the_fastest():
    assert plan("lowest-latency", 3, 0, {}, NOW, latency={0: 0.8}).order[:2] == (1, 2)
    order = plan("lowest-latency", 3, 0, {}, NOW, latency={0: 0.8, 1: 0.05, 2: 0.2}).order
    assert order == (1, 2, 0)


def test_lowest_latency_sends_a_small_share_in_rotation_order():
    rng, position, firsts = random.Random(7), 0, []
    for _ in range(1000):
        result = plan(
            "lowest-latency", 3, position, {}, NOW, latency={0: 0.8, 1: 0.05, 2: 0.2}, rng=rng
        )
        firsts.append(result.order[0])
        position = result.position
    others = 1000 - firsts.count(1)
    # exploring is drawn with probability EXPLORE, and then a third of the draws are member 1
    assert 0.5 * EXPLORE * 1000 < others < 1.5 * EXPLORE * 1000
    assert firsts.count(0) > 0 and firsts.count(2) > 0


def test_random_follows_the_weights():
    rng = random.Random(3)
    firsts = [plan("random", 2, 0, {}, NOW, weights=(3, 1), rng=rng).order[0] for _ in range(4000)]
    assert 0.72 < firsts.count(0) / 4000 < 0.78
    # the failover order after the first choice is random too, and has every member once
    orders = {plan("random", 3, 0, {}, NOW, rng=rng).order for _ in range(200)}
    assert len(orders) == 6


@pytest.mark.parametrize("policy", ["least-busy", "lowest-latency", "random"])
def test_every_policy_keeps_tool_turns_and_sticky_conversations_on_their_member(policy):
    rng = random.Random(1)
    busy, latency = {2: 5}, {0: 0.01, 1: 0.02, 2: 0.9}
    kwargs = {"busy": busy, "latency": latency, "rng": rng}
    assert plan(policy, 3, 0, {}, NOW, pinned=2, **kwargs).order == (2,)
    assert plan(policy, 3, 0, {}, NOW, preferred=2, **kwargs).order[0] == 2
    # and limits and cooldowns: a member at its limit is never first, one cooling down is last
    result = plan(policy, 3, 0, {0: NOW + 5}, NOW, blocked={1: NOW + 9}, **kwargs)
    assert result.order == (2,) and result.skipped == (0,)


# --- limits: what a window holds -------------------------------------------------------------


@pytest.mark.parametrize(
    "member_limits,events,free",
    [
        ({"rpm": 3}, [(NOW - 50, 0), (NOW - 30, 0)], None),
        ({"rpm": 3}, [(NOW - 50, 0), (NOW - 30, 0), (NOW - 10, 0)], NOW + 10),
        ({"rpm": 2}, [(NOW - 70, 0), (NOW - 30, 0)], None),  # the first left the window
        ({"rpd": 2}, [(NOW - 80_000, 0), (NOW - 10, 0)], NOW - 80_000 + 86400),
        ({"tpm": 100}, [(NOW - 40, 60), (NOW - 20, 30)], None),  # 90 < 100
        ({"tpm": 100}, [(NOW - 40, 60), (NOW - 20, 50)], NOW + 20),  # 110: wait for the 60
        ({"tpm": 100}, [(NOW - 40, 60), (NOW - 20, 150)], NOW + 40),  # one request over it
        ({"rpm": 5, "tpm": 100}, [(NOW - 40, 60), (NOW - 20, 50)], NOW + 20),
    ],
)
def test_when_a_member_has_room_again(member_limits, events, free):
    assert limits.free_at(member_limits, events, NOW) == free


def test_usage_in_the_current_window():
    events = [(NOW - 100, 10), (NOW - 30, 20), (NOW - 5, 5)]
    assert limits.usage({"rpm": 3, "tpd": 1000}, events, NOW) == [
        limits.Use("rpm", 2, 3),
        limits.Use("tpd", 35, 1000),
    ]


def test_a_limit_is_full_when_its_window_holds_as_many_requests_or_tokens():
    totals = {60.0: (3, 90), 86400.0: (10, 500)}
    assert limits.full({"rpm": 3}, totals)
    assert not limits.full({"rpm": 4, "tpm": 100}, totals)
    assert limits.full({"tpm": 90}, totals)
    assert limits.full({"rpm": 4, "tpd": 500}, totals)


# --- tiers (issue 22) --------------------------------------------------------------------------


def test_the_lowest_tier_with_an_available_member_is_chosen_and_the_others_follow():
    tiers = (1, 1, 2)
    firsts = []
    position = 0
    for _ in range(4):
        result = plan("roundrobin", 3, position, {}, NOW, tiers=tiers)
        firsts.append(result.order[0])
        assert result.order[-1] == 2 and result.why == "rotation, tier 1"
        position = result.position
    assert firsts == [0, 1, 0, 1]  # the rotation within tier 1; tier 2 only after both
    both_full = plan("roundrobin", 3, 0, {}, NOW, tiers=tiers, blocked={0: NOW + 5, 1: NOW + 9})
    assert (both_full.order, both_full.why) == ((2,), "rotation, tier 2")
    cooling = plan("roundrobin", 3, 0, {0: NOW + 30, 1: NOW + 30}, NOW, tiers=tiers)
    assert cooling.order == (2,) and cooling.skipped == (0, 1)
    assert plan("roundrobin", 3, 0, {0: NOW - 1}, NOW, tiers=tiers).order[0] == 0  # back down


def test_tiers_hold_for_every_policy_and_a_preferred_member_waits_for_its_tier():
    tiers = (2, 1, 1)
    for policy in ("failover", "least-busy", "lowest-latency", "random"):
        result = plan(policy, 3, 0, {}, NOW, tiers=tiers, rng=random.Random(1))
        assert result.order[0] in (1, 2) and result.order[-1] == 0, policy
    assert plan("roundrobin", 3, 0, {}, NOW, tiers=tiers, preferred=0).order[0] == 1
    full = {1: NOW + 1, 2: NOW + 1}
    assert plan("roundrobin", 3, 0, {}, NOW, tiers=tiers, preferred=0, blocked=full).order == (0,)
    every = dict.fromkeys(range(3), NOW + 7)
    waiting = plan("roundrobin", 3, 0, {}, NOW, tiers=tiers, blocked=every)
    assert (waiting.order, waiting.wait) == ((), (NOW + 7, 0))
