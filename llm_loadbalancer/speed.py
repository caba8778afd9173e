"""The prompt path's speed tricks, fenced here: each does what the plain code beside it in the
docstring does, faster, with the saving that bench/run.py measured (step 3, added time per
prompt in-process). Keep one only while the benchmark shows its saving.
"""

from __future__ import annotations

import copy
import copyreg

_plain: dict[type, bool] = {}  # class: whether copy.copy would copy its instances' __dict__


def shallow_copy(obj):
    """``copy.copy(obj)``. For an instance of a class that customises nothing of copying (llm's
    Prompt), the same copy made directly: a new instance with the same attributes, without
    copy.copy's generic look-ups, which cost more than the copy (every prompt makes one). A
    class is looked at once, the first time one of its instances is copied. Saves about 5 us
    per prompt."""
    cls = type(obj)
    plain = _plain.get(cls)
    if plain is None:
        plain = _plain[cls] = (
            hasattr(obj, "__dict__")
            and cls.__new__ is object.__new__  # (not a subclass of dict, int, str ...)
            and not hasattr(cls, "__getnewargs_ex__")
            and not hasattr(cls, "__getnewargs__")
            and not hasattr(cls, "__slots__")
            and not hasattr(cls, "__copy__")
            and not hasattr(cls, "__setstate__")
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", None) is getattr(object, "__getstate__", None)
            and cls not in copyreg.dispatch_table
        )
    if not plain:
        return copy.copy(obj)
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    return new
