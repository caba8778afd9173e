"""Weights of any allowed size through llm (issue 20): the weighted cycle is never built, so a
weight of 1,000,000,000 answers as a weight of 3 does. The cycle itself (its order, each
member's exact share) is tested as a pure function in test_policy.py."""

import json

from conftest import save_lb


def test_a_weight_of_a_billion_answers_like_any_other(run_llm):
    # the cycle was built with one entry per unit of weight, and this prompt never ended
    save_lb("big", "echo weight=1000000000", "echo example_bool=true")
    answers = [run_llm("-m", "lb:big", "hi") for _ in range(3)]
    assert [answer.exit_code for answer in answers] == [0, 0, 0]
    # the heavy member (no options) each time: the other's one turn is halfway through the cycle
    assert [json.loads(answer.stdout).get("options") for answer in answers] == [None] * 3
