"""What the store tests (test_store.py, test_store_sqlite.py) share."""

import itertools

from llm_loadbalancer.store import Outcome


_keys = itertools.count(1)


def echo(**settings):
    """A member (echo), with its settings: weight, rpm, rpd, tpm, tpd, and a key of its own
    (``key=`` to share one): each member is its own provider's bucket, unless a test says."""
    return {"model": "echo", "key": f"k{next(_keys)}", **settings}


def chosen(st, balancer, now, **kwargs):
    "The plan of one prompt at ``now`` that then succeeds (its request counted, not in flight)."
    choice = st.choose(balancer, now=now, **kwargs)
    if choice.ticket is not None:
        st.record(balancer, choice.plan.order[0], Outcome(), ticket=choice.ticket, now=now)
    return choice.plan


class Ask:
    """What a prompt asks of token limits, as ``estimates.Demand`` says it: its input's
    estimate, and the cap its members' options set on the answer (None: none)."""

    def __init__(self, input_tokens, cap=None):
        self.input = input_tokens
        self._cap = cap

    def cap(self, member):
        return self._cap
