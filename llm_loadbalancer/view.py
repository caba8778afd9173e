"""What a member sees of the response it writes into.

A member's ``execute`` is given the outer response (so that its chunks, stream events, usage,
tool calls and ``response_json`` are the response's own and llm logs them), but any plugin may
read what it can reach from there: llm-anthropic reads ``response.prompt.options.cache`` while
it records usage. Through a ``MemberView`` the member reaches its own prompt (its model, its
own Options class) and its own model; everything else is the outer response's. Once detached
(a member abandoned after the balancer's timeout), nothing it writes reaches the response.
"""

from __future__ import annotations


def _ignored(*args, **kwargs):
    return None


class MemberView:
    __slots__ = ("_outer", "_own", "_detached")

    def __init__(self, outer, prompt, model):
        object.__setattr__(self, "_outer", outer)
        object.__setattr__(self, "_own", {"prompt": prompt, "model": model})
        object.__setattr__(self, "_detached", False)

    @property
    def __class__(self):  # isinstance(view, llm.Response) holds, as for the real thing
        return type(self._outer)

    def detach(self) -> None:
        "From now on what the member writes is dropped, and its calls do nothing."
        object.__setattr__(self, "_detached", True)

    def __getattr__(self, name):
        own = self._own
        if name in own:
            return own[name]
        value = getattr(self._outer, name)
        if self._detached and callable(value):
            return _ignored
        return value

    def __setattr__(self, name, value):
        if self._detached or name in ("prompt", "model"):
            self._own[name] = value
        else:
            setattr(self._outer, name, value)

    def __repr__(self):
        return f"<MemberView of {self._outer!r}>"
