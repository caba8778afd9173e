"""Registering every saved balancer as an ``lb:NAME`` model (and its async twin), or, for
``kind: embedding``, as an ``lb:NAME`` embedding model.

llm calls ``register_models`` on every ``get_model()`` (``register_embedding_models`` on every
``get_embedding_model()``), so this stays cheap: each file is parsed once per process (cached
by modification time and size), and the Options class of a set of members is built once. A
broken file or a missing member never stops registration: the balancer is registered with its
problem, which prompting it reports. A file too broken to say its kind is registered as both.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import click
import llm

from . import config
from .config import CHAT, EMBEDDING, ConfigError
from .members import Catalog, check_saved, load_stored_keys
from .model import AsyncLoadBalancerModel, LoadBalancerModel

# What a process keeps between model lookups (llm registers every model again at each one):
# a file's parse, by path and (modification time, size): about 100 us a file per lookup after
# the first; a balancer's Options class (pydantic), built once: 0.35 to 0.5 ms; and its two
# model classes (``_classes``), which ``llm models --options`` also needs to be one per name.
_parsed: dict[str, tuple[tuple[int, int], object]] = {}
_options_classes: dict[tuple[str, tuple], type] = {}
_model_classes: dict[str, tuple[type, type]] = {}


def _load_cached(name: str, entry: os.DirEntry):
    "The parsed Balancer, or the ConfigError it gives; re-read only when the file changed."
    path = Path(entry.path)
    try:
        info = entry.stat()
    except OSError as ex:
        return ConfigError(f"{path}: cannot be read: {ex}")
    stamp = (info.st_mtime_ns, info.st_size)
    cached = _parsed.get(entry.path)
    if cached and cached[0] == stamp:
        return cached[1]
    try:
        result = config.load(name, path)
    except config.Unreadable as ex:  # (tried again at the next look-up, the file unchanged)
        return ex
    except ConfigError as ex:
        result = ex
    except Exception as ex:  # whatever a file holds, llm itself keeps working
        result = ConfigError(
            f"{path}: cannot be read: {config.cut(f'{type(ex).__name__}: {ex}', 200)}"
        )
    _parsed[entry.path] = (stamp, result)
    return result


class UnsharedOption(click.ClickException):
    "An option given to lb:NAME that not every member has (one line, not pydantic's wording)."


def shared_options(name: str, classes: tuple) -> type:
    "An Options class with the fields that every member's Options class has."
    cached = _options_classes.get((name, classes))
    if cached is not None:
        return cached
    import pydantic

    first = classes[0].model_fields
    shared = [field for field in first if all(field in cls.model_fields for cls in classes[1:])]
    fields = {field: (first[field].annotation, first[field]) for field in shared}

    def only_shared(cls, data):
        unknown = [key for key in data if key not in shared] if isinstance(data, dict) else []
        if unknown:
            raise UnsharedOption(
                f"lb:{name}: option {config.cut(str(unknown[0]))!r} is not one that every "
                f"member has: lb:{name} takes {', '.join(shared) or 'no options'} "
                f"('llm models --options -m lb:{name}' describes them)"
            )
        return data

    options = pydantic.create_model(
        "LoadBalancerOptions",
        __base__=llm.Options,
        __validators__={"only_shared": pydantic.model_validator(mode="before")(only_shared)},
        **fields,
    )
    _options_classes[(name, classes)] = options
    return options


def register_balancers(register, model_aliases) -> None:
    entries = config.entries()
    if not entries:
        return
    catalog = Catalog(model_aliases)
    keys = None
    for name, entry in entries:
        balancer = _load_cached(name, entry)
        if balancer.kind == EMBEDDING:  # a broken file's kind is None when it is unclear
            continue
        if isinstance(balancer, ConfigError):
            _register(register, name, None, None, llm.Options, str(balancer))
            continue
        if keys is None and any(member.key for member in balancer.members):
            keys = load_stored_keys()  # read only when some member names a key
        try:
            found, missing = check_saved(balancer, catalog, keys or {})
        except Exception as ex:  # ConfigError, or whatever a member's model raises
            problem = ex if isinstance(ex, ConfigError) else f"{type(ex).__name__}: {ex}"
            _register(register, name, balancer, None, llm.Options, f"{entry.path}: {problem}")
            continue
        # a member that is not installed is skipped, loudly, at each prompt
        members = [mwa and (mwa.model, mwa.async_model) for mwa in found]
        classes = tuple((pair[0] or pair[1]).Options for pair in members if pair is not None)
        options = partial(shared_options, name, classes)
        _register(register, name, balancer, members, options, None, missing)


def register_embedding_balancers(register) -> None:
    """Embedding balancers, with nothing but their files read: their members are looked up when
    one is used (a lookup here would run this hook again)."""
    for name, entry in config.entries():
        loaded = _load_cached(name, entry)
        if loaded.kind == CHAT:
            continue
        # imported here, not at the top, and only for an embedding balancer: a chat model lookup
        # (every prompt makes one) does not need it (0.2 ms per process, by -X importtime)
        from .embedding import EmbeddingBalancer

        if isinstance(loaded, ConfigError):
            register(EmbeddingBalancer(name, None, str(loaded)))
        else:
            register(EmbeddingBalancer(name, loaded, None, entry.path))


def _classes(name: str) -> tuple[type, type]:
    """The sync and async model classes of one balancer: a class of its own, because
    ``llm models --options`` describes the options of each model class once."""
    found = _model_classes.get(name)
    if found is None:
        found = _model_classes[name] = (
            type(LoadBalancerModel.__name__, (LoadBalancerModel,), {}),
            type(AsyncLoadBalancerModel.__name__, (AsyncLoadBalancerModel,), {}),
        )
    return found


def _register(register, name, balancer, members, options, problem, missing=None) -> None:
    sync_class, async_class = _classes(name)
    register(
        sync_class(name, balancer, members, options, problem, missing),
        async_class(name, balancer, members, options, problem, missing),
    )
