"""A Redis server that cannot be used is not llm down: ``WithFallback`` is a balancer's shared
store that, when the server fails (``Unreachable``), answers from this machine's file instead,
with one warning per process, until the process tries the server again (``store.TRY_AGAIN``).
Limits then still hold within this machine.
"""

from __future__ import annotations

from ..config import Balancer
from . import Choice, Outcome, Store, Unreachable


class WithFallback:
    "A shared store, and the local one that answers whenever the shared one cannot."

    def __init__(self, shared: Store, local: Store, balancer: Balancer, process):
        self.shared = shared
        self.local = local
        self.balancer = balancer
        self.process = process  # what this process knows of servers found down

    def _usable(self) -> bool:
        return not self.process.is_down(self.shared.url)

    def _fall_back(self, problem: Unreachable) -> None:
        self.process.fall_back(self.balancer, self.shared.url, problem)

    def choose(self, balancer: Balancer, **kwargs) -> Choice:
        if self._usable():
            try:
                return self.shared.choose(balancer, **kwargs)
            except Unreachable as ex:
                self._fall_back(ex)
        return self.local.choose(balancer, **kwargs)

    def claim(self, balancer: Balancer, member: int, now: float | None = None):
        if self._usable():
            try:
                return self.shared.claim(balancer, member, now)
            except Unreachable as ex:
                self._fall_back(ex)
        return self.local.claim(balancer, member, now)

    def record(
        self, balancer: Balancer, member: int, outcome: Outcome, *, ticket=None, now=None
    ) -> None:
        if _counted_by_the_file(ticket):  # chosen while the server was down
            return self.local.record(balancer, member, outcome, ticket=ticket, now=now)
        if self._usable():
            try:
                return self.shared.record(balancer, member, outcome, ticket=ticket, now=now)
            except Unreachable as ex:
                self._fall_back(ex)
        # a ticket of the server means nothing to the file
        self.local.record(balancer, member, outcome, now=now)

    def finish(self, balancer: Balancer, member: int, ticket, now: float | None = None) -> None:
        if _counted_by_the_file(ticket):
            return self.local.finish(balancer, member, ticket, now)
        if not self._usable():
            return  # a ticket of the server means nothing to the file
        try:
            self.shared.finish(balancer, member, ticket, now)
        except Unreachable as ex:
            self._fall_back(ex)

    def reset(self, balancer: Balancer) -> None:
        self.local.reset(balancer)
        self.shared.reset(balancer)

    def stats(self, balancer: Balancer, now: float | None = None) -> list[dict]:
        return self.shared.stats(balancer, now)

    def report(self, balancer: Balancer) -> dict:
        return self.shared.report(balancer)


def _counted_by_the_file(ticket) -> bool:
    "The file's tickets are (at, number); a server's, its own string."
    return isinstance(ticket, tuple)
