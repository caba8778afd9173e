"""The speed tricks, fenced here: each does what the plain code its docstring names does,
faster, with the saving measured (bench/run.py; -X importtime for what every process pays).
Keep one only while the measurement shows its saving.
"""

from __future__ import annotations

import copy
import copyreg
import dataclasses
from dataclasses import dataclass
from operator import attrgetter

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


def prompt_messages(prompt):
    """``prompt.messages``. llm 0.36 gives a prompt of a conversation its whole chain
    (``_explicit_messages``), which the property copies, after an import statement, on every
    read: read here as it is given, the prompt's own list, which callers only read. Saves about
    2 us a prompt."""
    given = getattr(prompt, "_explicit_messages", None)
    return prompt.messages if given is None else given


def kept(cache: dict, key, make, most: int = 64):
    """``make(key)``, kept in ``cache`` (emptied once it holds ``most``): for what is made again
    and again from the same few keys, as what a statement's text says from prompt to prompt."""
    found = cache.get(key)
    if found is None:
        if len(cache) >= most:
            cache.clear()
        found = cache[key] = make(key)
    return found


_keyed: dict[type, bool] = {}  # class: whether it is an llm.KeyModel or llm.AsyncKeyModel


def key_model(model) -> bool:
    """``isinstance(model, (llm.KeyModel, llm.AsyncKeyModel))``, looked at once per class (an
    isinstance of llm's abstract classes costs 0.4 us). Not kept for an object whose
    ``__class__`` is not its type (a proxy: isinstance reads both), nor past 256 classes."""
    cls = type(model)
    found = _keyed.get(cls)
    if found is None:
        import llm

        found = isinstance(model, (llm.KeyModel, llm.AsyncKeyModel))
        if model.__class__ is cls and len(_keyed) < 256:
            _keyed[cls] = found
    return found


# --- Member and Balancer (config.py): frozen dataclasses without dataclass's exec ------------


class _Factory:
    "An argument not given, whose value the field's default_factory makes."

    def __repr__(self) -> str:
        return "<factory>"  # as dataclass's own shows it in a signature


FACTORY = _Factory()


class Frozen:
    """The methods that ``@dataclass(frozen=True)`` would give Member and Balancer, written once.

    ``dataclass`` builds each of them from source with ``exec`` when the class is created, and
    every llm process that looks up a model creates these two classes: that cost 1.6 ms per
    process (importing config.py took 2.1 ms, and takes 0.5 ms with these: the median of 300
    imports, bytecode cached; -X importtime: 2.6 and 0.9 ms, a first import). ``frozen_record``
    keeps the classes dataclasses (``dataclasses.fields``, ``replace``); what these methods compare,
    hash and show follows the fields' own flags, as dataclass's generated methods do.
    tests/test_import_cost.py compares them with a ``@dataclass(frozen=True)`` of the same
    fields."""

    __slots__ = ()
    # set by frozen_record: the class itself, attrgetters of the fields that it compares, hashes
    # and shows, and the names of those it shows
    _frozen_class = _compared = _hashed = _shown = None
    _shown_names = ()

    def __eq__(self, other):
        if other.__class__ is self.__class__:
            return self._compared(self) == self._compared(other)
        return NotImplemented

    def __hash__(self):
        return hash(self._hashed(self))

    def __repr__(self):
        values = self._shown(self)
        shown = ", ".join(f"{name}={value!r}" for name, value in zip(self._shown_names, values))
        return f"{self.__class__.__qualname__}({shown})"

    def __setattr__(self, name, value):
        if type(self) is self._frozen_class or name in self.__dataclass_fields__:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if type(self) is self._frozen_class or name in self.__dataclass_fields__:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        super().__delattr__(name)


def frozen_record(cls):
    "A dataclass with Frozen's methods and the class's own ``__init__``."
    cls = dataclass(init=False, repr=False, eq=False)(cls)
    fields = dataclasses.fields(cls)
    shown = tuple(f.name for f in fields if f.repr)
    for attribute, names in (
        ("_compared", [f.name for f in fields if f.compare]),
        ("_hashed", [f.name for f in fields if (f.compare if f.hash is None else f.hash)]),
        ("_shown", shown),
    ):
        # more than one name: attrgetter then gives a tuple, as dataclass's methods build one
        assert len(names) > 1, names
        setattr(cls, attribute, staticmethod(attrgetter(*names)))
    cls._shown_names = shown
    cls._frozen_class = cls
    return cls
