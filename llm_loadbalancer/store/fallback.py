"""A state that cannot be used is not llm down: ``WithFallback`` is a store that, when its
backend fails (``StateUnavailable``), answers from another instead, with one warning per
process, until the process tries the first again (``store.TRY_AGAIN``):

- a balancer's Redis server, backed by this machine's file: limits then hold within the
  machine;
- this machine's file, backed by this process's state in memory (an SQLite database of its
  own): limits then hold within the process. A file whose lock another process holds costs
  this process one wait, not one per prompt.

A ticket handed out by the fallback is wrapped (``Fallen``), so that its outcome goes back to
the store that counted it.
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import Balancer
from . import Choice, Outcome, StateUnavailable, Store


class Fallen(NamedTuple):
    "A ticket of the fallback store."

    ticket: object

    @property
    def leased(self) -> bool:
        return self.ticket.leased

    @property
    def probe(self) -> bool:
        return getattr(self.ticket, "probe", False)


class WithFallback:
    "A store, and the one that answers whenever it cannot."

    def __init__(self, first: Store, fallback: Store, balancer: Balancer | None, process):
        self.first = first
        self.fallback = fallback
        self.balancer = balancer  # named in the warning (None: the file, for every balancer)
        self.process = process  # what this process knows of stores found unusable
        self.name = first.name

    def _usable(self) -> bool:
        return not self.process.is_down(self.name)

    def _fall_back(self, problem: StateUnavailable) -> None:
        self.process.fall_back(self.balancer, self.name, problem)

    def choose(self, balancer: Balancer, **kwargs) -> Choice:
        if self._usable():
            try:
                return self.first.choose(balancer, **kwargs)
            except StateUnavailable as ex:
                self._fall_back(ex)
        choice = self.fallback.choose(balancer, **kwargs)
        return choice._replace(ticket=_wrapped(choice.ticket))

    def claim(self, balancer: Balancer, member: int, now: float | None = None, demand=None):
        if self._usable():
            try:
                return self.first.claim(balancer, member, now, demand)
            except StateUnavailable as ex:
                self._fall_back(ex)
        return _wrapped(self.fallback.claim(balancer, member, now, demand))

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        if isinstance(ticket, Fallen):  # chosen while the first store could not be used
            return self.fallback.record(balancer, member, outcome, ticket=ticket.ticket, now=now)
        if self._usable():
            try:
                return self.first.record(balancer, member, outcome, ticket=ticket, now=now)
            except StateUnavailable as ex:
                self._fall_back(ex)
        # a ticket of the first store means nothing to the fallback
        self.fallback.record(balancer, member, outcome, now=now)

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        self._about(balancer, member, ticket, now, "finish")

    def renew(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        self._about(balancer, member, ticket, now, "renew")

    def _about(self, balancer, member, ticket, now, what: str) -> None:
        "A request in flight, told to the store that counted it."
        if isinstance(ticket, Fallen):
            return getattr(self.fallback, what)(balancer, member, ticket.ticket, now)
        if not self._usable():
            return  # a ticket of the first store means nothing to the fallback
        try:
            getattr(self.first, what)(balancer, member, ticket, now)
        except StateUnavailable as ex:
            if what != "renew":  # (a lease renewed in the background: tried again next time)
                self._fall_back(ex)

    def reset(self, balancer: Balancer) -> None:
        self.fallback.reset(balancer)
        self.first.reset(balancer)

    def retire(self, balancer: Balancer) -> None:
        self.fallback.retire(balancer)
        self.first.retire(balancer)

    def declare(self, balancer: Balancer, now: float | None = None) -> None:
        self.first.declare(balancer, now)

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        return self.first.stats(balancer, now)

    def route(self, balancer: Balancer, **kwargs):
        return self.first.route(balancer, **kwargs)

    def affinity(self, balancer: Balancer, now: float | None = None) -> dict:
        return self.first.affinity(balancer, now)

    def report(self, balancer: Balancer) -> dict:
        return self.first.report(balancer)


def _wrapped(ticket):
    "A ticket of the fallback, marked as such (None and False, for no ticket, as they are)."
    return ticket if ticket is None or ticket is False else Fallen(ticket)
