"""Asking a member once: its SDK's own retries, off for the balancer's own calls only.

The openai and anthropic SDKs (behind llm's OpenAI plugin, llm-anthropic and other plugins
built on them) retry a 429, a 5xx or a connection error twice by themselves, honouring
``Retry-After``: seconds to minutes before the balancer sees the error. While another member
can answer, that member *is* the retry. The SDKs read a request's retry budget through
``FinalRequestOptions.get_max_retries``; wrapped once per process, it answers 0 only while a
context variable says so, and the balancer sets that variable around each step of a member
that is not the last one to be tried. Context variables belong to one thread or asyncio task,
so other threads, other tasks and other models in the same process keep their retries.
"""

from __future__ import annotations

import contextvars
import sys

SDKS = ("openai", "anthropic")
_off = contextvars.ContextVar("llm_loadbalancer_sdk_retries_off", default=False)
_wrapped: set[str] = set()


def _wrap(sdk: str) -> None:
    options = getattr(sys.modules.get(f"{sdk}._models"), "FinalRequestOptions", None)
    original = getattr(options, "get_max_retries", None)
    if original is None or getattr(original, "_llm_loadbalancer", False):
        return

    def get_max_retries(self, max_retries):
        return 0 if _off.get() else original(self, max_retries)

    get_max_retries._llm_loadbalancer = True
    options.get_max_retries = get_max_retries


def off():
    "Turn the SDKs' retries off in this context; returns the token for ``restore``."
    for sdk in SDKS:
        if sdk not in _wrapped and sdk in sys.modules:
            _wrap(sdk)
            _wrapped.add(sdk)
    return _off.set(True)


def restore(token) -> None:
    _off.reset(token)


def are_off() -> bool:
    return _off.get()
