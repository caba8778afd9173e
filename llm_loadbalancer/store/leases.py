"""Prompts in flight (least-busy) count while their lease lasts (``rules.LEASE`` seconds), and
the process renews the lease of each of its prompts every ``rules.RENEW`` seconds while it
runs, from one thread of its own, started with the first such prompt. A process that dies
renews nothing: its prompts stop counting within a lease, whatever becomes of its process id,
on whatever host it ran. Nothing here asks the system about another process (on Windows,
signalling one with signal 0, the POSIX way to ask whether it runs, would end it).
"""

from __future__ import annotations

import threading
import time

from . import StateUnavailable


class Leases:
    "The prompts in flight of this process, whose leases it renews."

    def __init__(self, every: float):
        self.every = every
        self.held: dict[int, tuple] = {}  # id(ticket): (store, balancer, member, ticket)
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def hold(self, store, balancer, member: int, ticket) -> None:
        "Renew this prompt's lease until ``release``."
        with self.lock:
            self.held[id(ticket)] = (store, balancer, member, ticket)
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="llm-loadbalancer leases", daemon=True
                )
                self.thread.start()

    def release(self, ticket) -> None:
        with self.lock:
            self.held.pop(id(ticket), None)

    def renew(self, now: float | None = None) -> int:
        """Renew every lease held (``now``: a test's time); how many. A store that cannot be
        used renews none: its prompts stop counting, as a dead process's would."""
        with self.lock:
            held = list(self.held.values())
        for store, balancer, member, ticket in held:
            try:
                store.renew(balancer, member, ticket, now)
            except (StateUnavailable, ValueError, TypeError):  # (the others are renewed still)
                pass
        return len(held)

    def _run(self) -> None:
        while True:
            time.sleep(self.every)
            try:
                self.renew()
            except Exception:  # whatever a store raised, the other leases are renewed still
                pass
