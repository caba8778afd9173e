"""Resolving a balancer's members to installed models and checking them.

The same checks run when a balancer is saved (against ``llm.get_models_with_aliases()``)
and when it is registered or prompted (against the ``model_aliases`` that llm hands to
``register_models``): installed, not a balancer, options the member's model accepts, a
key name that is stored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json

import llm

from .config import CHAT, EMBEDDING, PREFIX, Balancer, ConfigError, Member, cut, parse_value


class NotInstalled(ConfigError):
    "A member's model is not installed (any more): its plugin is missing, or it is misspelt."


def model_of(mwa):
    "The model of an llm ``ModelWithAliases`` (or its async twin) or ``EmbeddingModelWithAliases``."
    return mwa.model or getattr(mwa, "async_model", None)


def _installed(kind: str) -> list:
    if kind == EMBEDDING:
        return llm.get_embedding_models_with_aliases()
    return llm.get_models_with_aliases()


class Catalog:
    """Installed models by id and alias, from a list of llm ``ModelWithAliases`` (chat models)
    or ``EmbeddingModelWithAliases`` (``kind`` embedding)."""

    def __init__(self, models_with_aliases, suggest: bool = False, kind: str = CHAT):
        self.suggest = suggest  # close matches for an unknown model: for commands, not lookups
        self.kind = kind
        self._aliases = None
        self.by_name: dict = {}
        for mwa in models_with_aliases:
            model = model_of(mwa)
            if model is None:
                continue
            self.by_name.setdefault(model.model_id, mwa)
            for alias in mwa.aliases:
                self.by_name.setdefault(alias, mwa)

    @classmethod
    def installed(cls, kind: str = CHAT) -> "Catalog":
        return cls(_installed(kind), suggest=True, kind=kind)

    def resolve(self, name: str):
        "The ``ModelWithAliases`` for a member's model, or a ConfigError saying why not."
        mwa = self.by_name.get(name)
        target = self._user_alias_target(name) if mwa is None else None
        model_id = model_of(mwa).model_id if mwa else (target or name)
        if name.startswith(PREFIX) or model_id.startswith(PREFIX):
            raise ConfigError(
                f"{cut(name)} is a load balancer, and load balancers cannot contain other "
                "load balancers: list its members instead"
            )
        if mwa is None:
            hint = (
                "'llm embed-models' lists them"
                if self.kind == EMBEDDING
                else "'llm models' lists them"
            )
            if self.suggest:  # not on registration, which every model lookup runs
                self._check_other_kind(name)
                choices = [n for n in self.by_name if not n.startswith(PREFIX)]
                close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}?" if close else hint
            raise NotInstalled(f"unknown model {cut(repr(name))}: {hint}")
        return mwa

    def _check_other_kind(self, name: str) -> None:
        "Refuse a chat model in an embedding balancer, and an embedding model in a chat one."
        other = CHAT if self.kind == EMBEDDING else EMBEDDING
        if name not in Catalog(_installed(other)).by_name:
            return
        if other == EMBEDDING:
            raise ConfigError(
                f"{cut(name)} is an embedding model: a balancer of embedding models is saved "
                "with 'llm lb save NAME --embedding MODEL MODEL ...' (kind: embedding)"
            )
        raise ConfigError(
            f"{cut(name)} is a chat model, not an embedding model: the members of an embedding "
            "balancer are embedding models ('llm embed-models' lists them)"
        )

    def _user_alias_target(self, name: str) -> str | None:
        "What ``llm aliases set`` points ``name`` at (read once, only on the error path)."
        if self._aliases is None:
            try:
                aliases = json.loads((llm.user_dir() / "aliases.json").read_text())
            except (OSError, ValueError):
                aliases = {}
            self._aliases = aliases if isinstance(aliases, dict) else {}
        target = self._aliases.get(name)
        return target if isinstance(target, str) else None


def load_stored_keys() -> dict:
    "The names (and values) of the keys stored with 'llm keys set'; {} when unreadable."
    try:
        keys = llm.load_keys()
    except (OSError, ValueError):
        return {}
    return keys if isinstance(keys, dict) else {}


def build_options(options_class, options: dict):
    "An instance of the model's Options class, or a ConfigError naming each bad option."
    try:
        return options_class(**options)
    except TypeError as ex:  # options that are not name=value
        raise ConfigError(f"options: {cut(str(ex), 200)}") from None
    except Exception as ex:  # pydantic's ValidationError, or a model's own validator's error
        _options_error(options_class, ex)


def _options_error(options_class, ex: Exception):
    "Raise the ConfigError for options the class refused, naming each bad option."
    import pydantic  # only once options are refused: every prompt builds its members' options

    if isinstance(ex, pydantic.ValidationError):
        problems = []
        for error in ex.errors()[:3]:
            loc = cut(".".join(str(part) for part in error.get("loc", ())) or "options")
            if error.get("type") == "extra_forbidden":
                known = ", ".join(options_class.model_fields) or "none"
                problems.append(f"unknown option {loc!r}: the model's options are {known}")
            else:
                problems.append(f"option {loc!r}: {cut(str(error.get('msg')), 200)}")
        raise ConfigError("; ".join(problems)) from None
    raise ConfigError(f"its options are refused: {cut(f'{type(ex).__name__}: {ex}', 200)}")


def typed_options(member: Member, catalog: Catalog) -> Member:
    """A member from the command line with its option values read for its model: each value
    as a YAML scalar (0.2, true, 100) where the model's option takes that, else as text
    (so fail=429 stays '429' for a text option)."""
    try:
        options_class = getattr(model_of(catalog.resolve(member.model)), "Options", None)
    except ConfigError:
        options_class = None
    if options_class is None:  # not installed, or an embedding model (which takes no options)
        return dataclasses.replace(
            member, options={k: parse_value(v) for k, v in member.options.items()}
        )
    return dataclasses.replace(
        member,
        options={name: _typed(options_class, name, text) for name, text in member.options.items()},
    )


def _typed(options_class, name: str, text: str):
    for candidate in (parse_value(text), text):
        try:
            return options_class(**{name: candidate}).model_dump(mode="json")[name]
        except Exception:  # invalid for the model (pydantic's or the model's own error)
            continue
    return parse_value(text)  # invalid either way: check_member names the problem


def check_key(member: Member, stored_keys: dict) -> None:
    # The value is never echoed: an unknown name may be a secret pasted by mistake.
    if member.key and member.key not in stored_keys:
        raise ConfigError(
            "key is not the name of a stored key ('llm keys list' shows them). "
            "Store the secret with 'llm keys set NAME' and use key=NAME: "
            "a balancer never holds a key's value"
        )


def check_member(position: int, member: Member, catalog: Catalog, stored_keys: dict):
    "Resolve and check one member; returns its ``ModelWithAliases``."
    try:
        mwa = catalog.resolve(member.model)
        if catalog.kind == CHAT:  # embedding models take no options (config.py says so)
            build_options(model_of(mwa).Options, member.options)
        check_key(member, stored_keys)
    except ConfigError as ex:
        # The member is described only on this path: registration runs on every model lookup.
        raise type(ex)(f"{member.describe(position, stored_keys)}: {ex}") from None
    return mwa


def check_saved(balancer: Balancer, catalog: Catalog, stored_keys: dict):
    """Check a saved balancer as prompting it does: a member that is not installed (any more)
    is skipped, not fatal. Returns each member's ``ModelWithAliases`` (None where it is not
    installed) and {member index: why it is skipped}; raises ConfigError for any other problem,
    or when no member is installed. An embedding balancer is checked as ``check_embedding``
    does: none of its members is skipped."""
    catalog = _of_kind(catalog, balancer.kind)
    if balancer.kind == EMBEDDING:
        return check_embedding(balancer, catalog, stored_keys), {}
    found, missing = [], {}
    for index, member in enumerate(balancer.members):
        try:
            found.append(check_member(index + 1, member, catalog, stored_keys))
        except NotInstalled as ex:
            found.append(None)
            missing[index] = str(ex)
    if len(missing) == len(found):
        raise ConfigError(cut(f"no member is installed: {'; '.join(missing.values())}", 300))
    return found, missing


def check_balancer(balancer: Balancer, catalog: Catalog, stored_keys: dict | None = None):
    "Check every member, as saving does; returns their ``ModelWithAliases`` in order."
    if stored_keys is None:
        stored_keys = load_stored_keys()
    catalog = _of_kind(catalog, balancer.kind)
    if balancer.kind == EMBEDDING:
        return check_embedding(balancer, catalog, stored_keys)
    return [
        check_member(position, member, catalog, stored_keys)
        for position, member in enumerate(balancer.members, 1)
    ]


def _of_kind(catalog: Catalog, kind: str) -> Catalog:
    "The catalog given, or the installed models of the balancer's kind when it holds the other."
    return catalog if catalog.kind == kind else Catalog.installed(kind)


def check_embedding(balancer: Balancer, catalog: Catalog, stored_keys: dict) -> list:
    """Every member of an embedding balancer installed, with the name of a stored key, and all
    one model once aliases are resolved: vectors of two models (or of one model at two
    dimensions, which llm names as two models) in one collection cannot be compared.
    Returns each member's ``EmbeddingModelWithAliases``."""
    found = [
        check_member(position, member, catalog, stored_keys)
        for position, member in enumerate(balancer.members, 1)
    ]
    first = model_of(found[0]).model_id
    for position, (member, mwa) in enumerate(zip(balancer.members, found), 1):
        model_id = model_of(mwa).model_id
        if model_id != first:
            raise ConfigError(
                f"{member.describe(position, stored_keys)}: it embeds with {cut(model_id)} and "
                f"member 1 with {cut(first)}: every member of an embedding balancer must be the "
                "same model (at the same dimensions), or the vectors in one collection could "
                "not be compared; balance several keys of one model instead"
            )
    return found
