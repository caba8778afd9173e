"""What a member sees of the response it writes into.

A member's ``execute`` is given the outer response (so that its chunks, stream events, usage,
tool calls and ``response_json`` are the response's own and llm logs them), but any plugin may
read what it can reach from there: llm-anthropic reads ``response.prompt.options.cache`` while
it records usage. Through a ``MemberView`` the member reaches its own prompt (its model, its
own Options class) and its own model; everything else is the outer response's.

Under the balancer's timeout a member may yet be abandoned, so its view starts *held*: what it
writes (attributes, and calls such as ``set_usage`` or ``add_tool_call``) is kept aside, and
reaches the response only when the attempt is accepted (its first chunk in time, or without
streaming its whole answer). ``detach()`` drops all of it, and everything after. A lock makes
the two exclusive with the writes of a member running in another thread.
"""

from __future__ import annotations

import functools
import threading

DIRECT, HELD, DETACHED = "direct", "held", "detached"
_SLOTS = ("_outer", "_own", "_state", "_pending", "_lock")


class MemberView:
    __slots__ = _SLOTS

    def __init__(self, outer, prompt, model, held: bool = False):
        object.__setattr__(self, "_outer", outer)
        object.__setattr__(self, "_own", {"prompt": prompt, "model": model})
        object.__setattr__(self, "_state", HELD if held else DIRECT)
        object.__setattr__(self, "_pending", [])
        object.__setattr__(self, "_lock", threading.Lock())

    @property
    def __class__(self):  # isinstance(view, llm.Response) holds, as for the real thing
        return type(self._outer)

    def accept(self) -> None:
        "The attempt counts: what the member wrote so far reaches the response, and from now on."
        with self._lock:
            if self._state != HELD:
                return
            for name, args, kwargs in self._pending:
                if name is None:  # an attribute set: (None, (attribute, value), {})
                    setattr(self._outer, *args)
                else:
                    getattr(self._outer, name)(*args, **kwargs)
            self._pending.clear()
            object.__setattr__(self, "_state", DIRECT)

    def detach(self) -> None:
        "The attempt is abandoned: nothing it wrote, or writes from now on, reaches the response."
        with self._lock:
            self._pending.clear()
            object.__setattr__(self, "_state", DETACHED)

    def __getattr__(self, name):
        if name in _SLOTS:  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        own = self._own
        if name in own:
            return own[name]
        value = getattr(self._outer, name)
        if self._state != DIRECT and callable(value):
            return functools.partial(self._call, name)
        return value

    def _call(self, name, *args, **kwargs):
        with self._lock:
            if self._state == DIRECT:
                return getattr(self._outer, name)(*args, **kwargs)
            if self._state == HELD:
                self._pending.append((name, args, kwargs))
        return None

    def __setattr__(self, name, value):
        if name in ("prompt", "model"):
            self._own[name] = value
            return
        if self._state == DIRECT:
            setattr(self._outer, name, value)
            return
        with self._lock:
            if self._state == DIRECT:
                setattr(self._outer, name, value)
                return
            self._own[name] = value  # what the member reads back
            if self._state == HELD:
                self._pending.append((None, (name, value), {}))

    def __copy__(self):
        "Another view of the same response, in the same state (held writes stay with this one)."
        other = MemberView(self._outer, self._own["prompt"], self._own["model"])
        object.__setattr__(other, "_state", self._state)
        return other

    def __str__(self):
        return str(self._outer)

    def __repr__(self):
        return f"<MemberView of {self._outer!r}>"
