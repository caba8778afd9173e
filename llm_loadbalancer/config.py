"""Balancer definitions: the typed form, parsing and validating it, and the files on disk.

One YAML file per balancer, ``llm.user_dir()/loadbalancers/NAME.yaml``. Every command and
model registration goes through ``parse`` / ``load``; this module checks the structure of a
definition. Whether its members exist is ``members.py``'s concern.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import stat
import tempfile
import time
from dataclasses import field
from pathlib import Path

import llm

from .speed import FACTORY, Frozen, frozen_record

_KEY_VALUE = re.compile(r"(?<![\w-])key=\S*")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The policies that policy.plan() knows. Here, not in policy.py: a model lookup then does not
# import policy.py only to check a file's policy (0.3 ms per process, by -X importtime).
POLICIES = ("roundrobin", "failover", "least-busy", "lowest-latency", "random")
DEFAULT_POLICY = "roundrobin"
DEFAULT_COOLDOWN = 30.0
# Bounds: a balancer file is read by every llm process that looks up a model, and a cooldown
# or timeout is a wait; nothing here may grow without limit.
MAX_FILE_BYTES = 64 * 1024
MAX_MEMBERS = 100
MAX_SECONDS = 86400.0  # the longest cooldown the balancer guesses, and timeout: one day
MAX_STATED_SECONDS = 7 * 86400.0  # the longest a reset the provider stated keeps a member out
SHOWN_CHARS = 60  # a value quoted back in a message is cut to this
DEFAULT_MAX_WAIT = 30.0
DEFAULT_QUOTA_COOLDOWN = 3600.0
CHAT, EMBEDDING = "chat", "embedding"
KINDS = (CHAT, EMBEDDING)  # what lb:NAME is: a chat model, or an embedding model
TOP_FIELDS = (
    "kind",
    "policy",
    "members",
    "sticky",
    "failover",
    "cooldown",
    "timeout",
    "max_wait",
    "quota_cooldown",
    "affinity",
    "state",
    "state_key",
)
# A member's own settings beside its model, key and options: its share of the rotation, and at
# most that many requests (rpm, rpd) or tokens (tpm, tpd) in any 60 s / 24 h window.
LIMITS = ("rpm", "rpd", "tpm", "tpd")
MEMBER_SETTINGS = ("weight", *LIMITS, "tier")
MEMBER_FIELDS = ("model", "key", *MEMBER_SETTINGS, "options")
MAX_COUNT = 10**9
PREFIX = "lb:"


class ConfigError(ValueError):
    """A balancer definition or name that cannot be used; the message is one line for the user.
    ``kind``: the kind of balancer a broken definition declares, where that is known."""

    def __init__(self, message: str = "", kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class Unreadable(ConfigError):
    """A balancer file the system would not let this process read at that moment (on Windows,
    while another process replaces it): not a fault of its text, so nothing remembers it."""


@frozen_record
class Member(Frozen):
    "One member of a balancer: a model (id or alias), a stored key's name, settings, options."

    model: str
    key: str | None = None
    options: dict = field(default_factory=dict, hash=False, compare=True)
    weight: int = 1
    rpm: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    tier: int = 1  # members of a higher tier are used only when no lower one is available

    def __init__(
        self,
        model: str,
        key: str | None = None,
        options: dict = FACTORY,
        weight: int = 1,
        rpm: int | None = None,
        rpd: int | None = None,
        tpm: int | None = None,
        tpd: int | None = None,
        tier: int = 1,
    ) -> None:
        # set where dataclass's __init__ sets them through object.__setattr__ (frozen: not
        # through this class's own __setattr__)
        self.__dict__.update(
            model=model,
            key=key,
            options={} if options is FACTORY else options,
            weight=weight,
            rpm=rpm,
            rpd=rpd,
            tpm=tpm,
            tpd=tpd,
            tier=tier,
        )

    @functools.cached_property
    def limits(self) -> dict:
        "{name: number} of the limits this member has (rpm, rpd, tpm, tpd)."
        return {name: getattr(self, name) for name in LIMITS if getattr(self, name)}

    def settings(self, stored_keys=None) -> list[str]:
        """Its key name, settings and options as the user sees them. Given the stored keys, a
        key that is not one of their names is not shown: it may be a pasted secret."""
        extras = []
        if self.key:
            shown = self.key if stored_keys is None or self.key in stored_keys else "(not stored)"
            extras.append(f"key: {shown}")
        if self.weight != 1:
            extras.append(f"weight={self.weight}")
        extras.extend(f"{name}={value}" for name, value in self.limits.items())
        if self.tier != 1:
            extras.append(f"tier={self.tier}")
        extras.extend(
            f"{'options.' if name in MEMBER_SETTINGS else ''}{name}={scalar(value)}"
            for name, value in self.options.items()
        )
        return extras

    def label(self, stored_keys=None) -> str:
        "How the member is named in a list: ``gpt-4o-mini (key: work, temperature=0.2)``."
        extras = self.settings(stored_keys)
        return f"{self.model} ({', '.join(extras)})" if extras else self.model

    def describe(self, position: int, stored_keys=None) -> str:
        "How one member is named in a message: ``member 2 (gpt-4o-mini, key: work)``."
        return f"member {position} ({', '.join([self.model, *self.settings(stored_keys)])})"

    def to_dict(self) -> dict:
        data: dict = {"model": self.model}
        if self.key:
            data["key"] = self.key
        if self.weight != 1:
            data["weight"] = self.weight
        data.update(self.limits)
        if self.tier != 1:
            data["tier"] = self.tier
        if self.options:
            data["options"] = dict(self.options)
        return data


@frozen_record
class Balancer(Frozen):
    "A balancer's definition, as its file holds it (and the folder it was read from)."

    name: str
    members: tuple[Member, ...]
    policy: str = DEFAULT_POLICY
    sticky: bool = False
    failover: bool = True
    cooldown: float = DEFAULT_COOLDOWN
    timeout: float | None = None  # seconds a member has for its first chunk; None: no limit
    max_wait: float = DEFAULT_MAX_WAIT  # seconds to wait when every member is at its limit
    quota_cooldown: float = DEFAULT_QUOTA_COOLDOWN  # after "quota exhausted"
    # seconds a long prompt prefix stays with the member that last served it (0: off)
    affinity: float = 0.0
    state: str | None = None  # where its state lives: a redis:// URL, or "local"; None: default
    state_key: str | None = None  # the stored key holding the Redis password
    kind: str = CHAT
    # llm.user_dir() as it was when the file was read: its state file and llm's model options
    # are there (None: llm.user_dir() now); not part of the definition
    user_dir: str | None = field(default=None, compare=False)

    def __init__(
        self,
        name: str,
        members: tuple[Member, ...],
        policy: str = DEFAULT_POLICY,
        sticky: bool = False,
        failover: bool = True,
        cooldown: float = DEFAULT_COOLDOWN,
        timeout: float | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        quota_cooldown: float = DEFAULT_QUOTA_COOLDOWN,
        affinity: float = 0.0,
        state: str | None = None,
        state_key: str | None = None,
        kind: str = CHAT,
        user_dir: str | None = None,
    ) -> None:
        self.__dict__.update(  # (as Member's)
            name=name,
            members=members,
            policy=policy,
            sticky=sticky,
            failover=failover,
            cooldown=cooldown,
            timeout=timeout,
            max_wait=max_wait,
            quota_cooldown=quota_cooldown,
            affinity=affinity,
            state=state,
            state_key=state_key,
            kind=kind,
            user_dir=user_dir,
        )

    @property
    def model_id(self) -> str:
        return PREFIX + self.name

    def to_dict(self) -> dict:
        "The file form: defaults are left out so that files stay short."
        data: dict = {} if self.kind == CHAT else {"kind": self.kind}
        data["policy"] = self.policy
        if self.sticky:
            data["sticky"] = True
        if not self.failover:
            data["failover"] = False
        if self.cooldown != DEFAULT_COOLDOWN:
            data["cooldown"] = self.cooldown
        if self.timeout is not None:
            data["timeout"] = self.timeout
        if self.max_wait != DEFAULT_MAX_WAIT:
            data["max_wait"] = self.max_wait
        if self.quota_cooldown != DEFAULT_QUOTA_COOLDOWN:
            data["quota_cooldown"] = self.quota_cooldown
        if self.affinity:
            data["affinity"] = self.affinity
        if self.state is not None:
            data["state"] = self.state
        if self.state_key is not None:
            data["state_key"] = self.state_key
        data["members"] = [member.to_dict() for member in self.members]
        return data

    @functools.cached_property
    def tiers(self) -> tuple[int, ...] | None:
        "Each member's tier, or None when all are in tier 1 (one list, as without tiers)."
        tiers = tuple(member.tier for member in self.members)
        return tiers if any(tier != 1 for tier in tiers) else None

    @functools.cached_property
    def weights(self) -> tuple[int, ...] | None:
        "Each member's weight, or None when all are 1 (plain rotation)."
        weights = tuple(member.weight for member in self.members)
        return weights if any(weight != 1 for weight in weights) else None

    @functools.cached_property
    def keyed(self) -> bool:
        "Whether a member names a stored key (a prompt then reads llm's keys)."
        return any(member.key for member in self.members)

    @functools.cached_property
    def signature(self) -> str:
        "Identifies the member list: the rotation starts again when it changes."
        return repr([member.to_dict() for member in self.members])


def scalar(value) -> str:
    "A value as the user wrote it (true, 0.2, text), cut short."
    if isinstance(value, bool):
        return "true" if value else "false"
    return cut(str(value))


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value) -> str:
    "A value quoted in a message: its repr, cut short (a file may hold anything)."
    return cut(repr(value))


_KINDS = {list: "a list", dict: "a mapping", str: "text", int: "a number", float: "a number"}


def kind(value) -> str:
    "What a YAML value is, in the user's words."
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true/false"
    return _KINDS.get(type(value), type(value).__name__)


# Names Windows keeps for devices, with or without an extension: aux.yaml is no file there
# (and COM¹, LPT² ..., which NAME_RE refuses already)
_DEVICE = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", re.I)
WINDOWS = os.name == "nt"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError("the load balancer name is empty: give one, e.g. llm lb save fast ...")
    if not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid load balancer name {shown(name)}: use 1-64 letters, digits, '-', '_' or "
            "'.', starting with a letter or digit (for lb:fast, the name is fast)"
        )
    if WINDOWS and _DEVICE.fullmatch(name):
        raise ConfigError(
            f"invalid load balancer name {shown(name)}: Windows keeps it for a device (CON, "
            "PRN, AUX, NUL, COM0-COM9, LPT0-LPT9), so it cannot name a file: choose another"
        )
    return name


def folder() -> Path:
    path = llm.user_dir() / "loadbalancers"
    if not path.is_dir():
        if path.exists() or path.is_symlink():
            raise ConfigError(
                f"{path} is not a folder: move it away, and llm-loadbalancer will keep its "
                "files there"
            )
        path.mkdir(parents=True, exist_ok=True)
    return path


def path_for(name: str) -> Path:
    return folder() / f"{check_name(name)}.yaml"


def same_but_case(name: str) -> str | None:
    """The saved balancer whose name differs from ``name`` only in case, when ``name`` itself
    is not saved and there is one such (on macOS and Windows their files would be one)."""
    saved = names()
    if name in saved:
        return None
    same = [other for other in saved if other.casefold() == name.casefold()]
    return same[0] if len(same) == 1 else None


def names() -> list[str]:
    "Names of the saved balancers, from the file names (whether or not the files are valid)."
    return [name for name, _ in entries()]


def entries() -> list[tuple[str, os.DirEntry]]:
    "(name, directory entry) of each balancer file, by name, without creating the folder."
    path = llm.user_dir() / "loadbalancers"
    try:
        found = [
            (entry.name[:-5], entry)
            for entry in os.scandir(path)
            if entry.name.endswith(".yaml")
            and NAME_RE.fullmatch(entry.name[:-5])
            and _is_file(entry)  # a FIFO would hang the reader
        ]
    except OSError:
        return []
    return sorted(found, key=lambda pair: pair[0])


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def skipped() -> list[str]:
    "Files in the folder that look meant as balancers but are not read, each with why."
    path = llm.user_dir() / "loadbalancers"
    try:
        names = sorted(entry.name for entry in os.scandir(path))
    except OSError:
        return []
    found = []
    for name in names:
        stem, dot, ending = name.rpartition(".")
        if name.startswith(".") or ending not in ("yaml", "yml", "json") or not dot:
            continue
        if not (path / name).is_file():
            found.append(f"{shown(name)}: not a regular file")
        elif ending != "yaml":
            found.append(f"{shown(name)}: balancer files end in .yaml: rename it {stem}.yaml")
        elif not NAME_RE.fullmatch(stem):
            found.append(
                f"{shown(name)}: not a load balancer name (1-64 letters, digits, '-', '_' or "
                "'.', starting with a letter or digit): rename it"
            )
    return found


def parse_value(text: str):
    "A setting's value, read like a YAML scalar: 0.2, true, 100, or text."
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None or isinstance(value, (dict, list)):
        return text
    return value


def split_words(text: str) -> list[str]:
    """A member's words, split as a shell splits them, but for backslashes: quotes group words
    (``system='be brief'``, ``"it's"``), and a backslash escapes only a quote or a space after
    it (``don\\'t``, ``be\\ brief``, ``"say \\"hi\\""``); any other is kept as written, so that
    a Windows path needs no doubling (shlex.split read ``C:\\x\\y`` as ``C:xy``). ValueError
    for a quote left open."""
    words, word, quote, started, i = [], [], None, False, 0
    while i < len(text):
        char, after = text[i], text[i + 1 : i + 2]
        if quote == "'":  # (as in a shell, nothing is escaped between single quotes)
            if char == "'":
                quote = None
            else:
                word.append(char)
        elif char == "\\" and _escapes(after, quote):
            word.append(after)
            started, i = True, i + 1
        elif quote == '"':
            if char == '"':
                quote = None
            else:
                word.append(char)
        elif char in "'\"":
            quote, started = char, True
        elif char.isspace():
            if started:
                words.append("".join(word))
            word, started = [], False
        else:
            word.append(char)
            started = True
        i += 1
    if quote is not None:
        raise ValueError("No closing quotation")
    if started:
        words.append("".join(word))
    return words


def _escapes(after: str, quote: str | None) -> bool:
    "Whether a backslash before ``after`` escapes it (``split_words``), within ``quote``."
    if quote is None:
        return after in ("'", '"') or (after != "" and after.isspace())
    return after == '"'  # (within double quotes)


def parse_member_spec(spec: str) -> Member:
    """``'gpt-4o-mini key=work temperature=0.2'``: a model, then name=value settings.
    Option values stay text here: ``members.typed_options`` gives them the member model's types."""
    shown = _KEY_VALUE.sub("key=...", spec)  # errors never repeat a key: it may be a secret
    try:
        words = split_words(spec)
    except ValueError as ex:
        raise ConfigError(f"member {shown!r}: {ex}")
    if not words:
        raise ConfigError("empty member: give a model id or alias, e.g. 'gpt-4o-mini key=work'")
    model, *given = words
    if "=" in model:
        raise ConfigError(
            f"member {shown!r} must start with a model id or alias, e.g. 'gpt-4o-mini key=work'"
        )
    key = None
    options: dict = {}
    settings: dict = {}
    for setting in given:
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise ConfigError(
                f"member {shown!r}: setting {_KEY_VALUE.sub('key=...', setting)!r} is not "
                "name=value (e.g. key=work or temperature=0.2)"
            )
        if name == "key":
            if not value:
                raise ConfigError(
                    f"member {shown!r}: key= needs the name of a stored key, e.g. key=work"
                )
            key = value
        elif name in MEMBER_SETTINGS:
            settings[name] = count(value, f"member {shown!r}: {name}")
        else:
            # options.NAME=value: an option of the model that shares a member setting's name
            name = name.removeprefix("options.")
            options[name] = value  # text: members.typed_options reads it for the model
    return Member(model=model, key=key, options=options, **settings)


def count(value, what: str) -> int:
    "A whole number from 1 to MAX_COUNT (text that reads as one counts: 3, '3')."
    number = value
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_COUNT:
        raise ConfigError(
            f"{what} must be a whole number from 1 to {MAX_COUNT:,}, not {shown(value)}"
        )
    return number


def _unknown(where: str, data: dict, fields) -> None:
    unknown = [shown(str(key)) for key in data if key not in fields][:5]
    if unknown:
        raise ConfigError(
            f"{where}unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
            f"the fields are {', '.join(fields)}"
        )


def from_dict(name: str, data) -> Balancer:
    "Check the structure of a definition and build the typed form."
    check_name(name)
    if data is None:
        raise ConfigError(
            "the definition is empty: a load balancer needs 'members' (a list of models)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"a load balancer definition is a mapping with 'policy' and 'members', not {kind(data)}"
        )
    _unknown("", data, TOP_FIELDS)
    balancer_kind = data.get("kind", CHAT)
    if balancer_kind not in KINDS:
        raise ConfigError(
            f"unknown kind {shown(balancer_kind)}: use chat (the default) or embedding"
        )
    policy = data.get("policy", DEFAULT_POLICY)
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {shown(policy)}: use one of {', '.join(POLICIES)}")
    sticky = _flag(data, "sticky", False)
    failover = _flag(data, "failover", True)
    cooldown = seconds(data.get("cooldown", DEFAULT_COOLDOWN), "cooldown", minimum=0)
    timeout = data.get("timeout")
    if timeout is not None:
        timeout = seconds(timeout, "timeout (the time a member has for its first chunk)")
    max_wait = seconds(data.get("max_wait", DEFAULT_MAX_WAIT), "max_wait", minimum=0)
    quota_cooldown = seconds(
        data.get("quota_cooldown", DEFAULT_QUOTA_COOLDOWN), "quota_cooldown", minimum=0
    )
    affinity = seconds(data.get("affinity", 0), "affinity", minimum=0)
    state = data.get("state")
    if state is not None:
        state = state_url(state, "state")
    state_key = data.get("state_key")
    if state_key is not None and (not isinstance(state_key, str) or not state_key.strip()):
        raise ConfigError(
            f"state_key must be the name of a stored key (llm keys set NAME), not {shown(state_key)}"
        )
    raw_members = data.get("members")
    if not isinstance(raw_members, list) or not raw_members:
        raise ConfigError("'members' must be a list with at least one member")
    if len(raw_members) > MAX_MEMBERS:
        raise ConfigError(f"{len(raw_members)} members: a load balancer has at most {MAX_MEMBERS}")
    members = tuple(_member(i, raw) for i, raw in enumerate(raw_members, 1))
    if balancer_kind == EMBEDDING:
        _check_embedding(sticky, members, affinity)
    return Balancer(
        name=name,
        members=members,
        policy=policy,
        sticky=sticky,
        failover=failover,
        cooldown=cooldown,
        timeout=timeout,
        max_wait=max_wait,
        quota_cooldown=quota_cooldown,
        affinity=affinity,
        state=state,
        state_key=state_key,
        kind=balancer_kind,
    )


STATE_SCHEMES = ("redis", "rediss")


def state_url(value, what: str) -> str:
    """Where a balancer's state lives: ``local`` (this machine's file), or a Redis server's URL
    (``redis://host:6379/0``, ``rediss://`` for TLS) without a password, which is a stored key's
    (``state_key``) so that no file holds it."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what} must be a redis:// URL or local, not {shown(value)}")
    value = value.strip()
    if value == "local":
        return value
    from urllib.parse import parse_qs, urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        parts = port = None
    if parts is None or parts.scheme not in STATE_SCHEMES or not parts.hostname:
        raise ConfigError(
            f"{what} must be a Redis URL such as redis://localhost:6379/0 (rediss:// for TLS), "
            f"or local, not {shown(shown_url(value))}"
        )
    if parts.password is not None or "password" in parse_qs(parts.query.lower()):
        raise ConfigError(
            f"{what} {shown(shown_url(value))}: a password in the URL is refused, "
            "because it would be kept in plain text: store it with 'llm keys set NAME' and "
            "name it with state_key: NAME (llm lb save --state-key NAME)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{what} {shown(shown_url(value))}: options after ? are refused (the plugin sets "
            "its own timeouts, so that a server that does not answer never holds llm up): "
            "give scheme://host:port/database only"
        )
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError(
            f"{what} {shown(value)}: the path is the database number (redis://host:6379/0), "
            f"not {shown(parts.path)}"
        )
    if port == 0:
        raise ConfigError(f"{what} {shown(value)}: port 0 is not a port")
    return value


def shown_url(url: str) -> str:
    """A URL as it may be shown: whatever precedes the last @ (a user name, a password, or a
    password written where the user name goes, even one holding / or @) is ***, and so is what
    follows a ? or # (options, which may hold one too)."""
    scheme, sep, rest = url.partition("//")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    cut_at = min((rest.find(mark) for mark in "?#" if mark in rest), default=-1)
    if cut_at >= 0:
        rest = rest[:cut_at] + rest[cut_at] + "***"
    return f"{scheme}{sep}{rest}"


def _check_embedding(sticky: bool, members: tuple[Member, ...], affinity: float = 0) -> None:
    "What an embedding balancer cannot have: conversations, options, token limits."
    if sticky:
        raise ConfigError(
            "sticky keeps a conversation on one member, and an embedding balancer has no "
            "conversations: remove sticky"
        )
    if affinity:
        raise ConfigError(
            "affinity sends a long prompt prefix back to the member that cached it, and an "
            "embedding balancer has no prompts: remove affinity"
        )
    for position, member in enumerate(members, 1):
        where = f"member {position} ({member.model})"
        if member.options:
            raise ConfigError(
                f"{where}: embedding models take no options in llm (a model's dimensions are "
                f"part of its id, e.g. text-embedding-3-small-512): remove "
                f"{', '.join(cut(name, 30) for name in member.options)}"
            )
        token_limits = [name for name in ("tpm", "tpd") if getattr(member, name)]
        if token_limits:
            raise ConfigError(
                f"{where}: {' and '.join(token_limits)}: embedding models do not tell llm how "
                "many tokens they used, so a token limit cannot be kept; limit requests "
                "(one per batch) with rpm or rpd"
            )


def declared_kind(data) -> str | None:
    "The kind a definition declares (chat when it does not say), or None when that is unclear."
    value = data.get("kind", CHAT) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value in KINDS else None


def seconds(value, what: str, minimum: float | None = None) -> float:
    """A number of seconds from 0 (``minimum``, inclusive; else exclusive) to MAX_SECONDS.
    Text that reads as a number counts (YAML reads 1e3 as text)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if (
        not _is_number(number)
        or not (number >= 0 if minimum == 0 else number > 0)
        or number > MAX_SECONDS
    ):
        low = ">= 0" if minimum == 0 else "> 0"
        raise ConfigError(
            f"{what} must be a number of seconds {low} and at most {MAX_SECONDS:g} (one day), "
            f"not {shown(value)}"
        )
    return float(number)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _flag(data: dict, name: str, default: bool) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {shown(value)}")
    return value


def _member(position: int, raw) -> Member:
    where = f"member {position}"
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} must be a mapping with 'model' (and optional key, options), not {kind(raw)}"
        )
    _unknown(f"{where}: ", raw, MEMBER_FIELDS)
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(f"{where} needs 'model': a model id or alias")
    if len(model) > 200:
        raise ConfigError(f"{where}: {shown(model)} is not a model id or alias")
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise ConfigError(f"{where} ({model}): 'key' must be the name of a stored key")
    options = raw.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ConfigError(
            f"{where} ({model}): 'options' must be a mapping of option names to values"
        )
    settings = {
        name: count(raw[name], f"{where} ({model}): {name}")
        for name in MEMBER_SETTINGS
        if raw.get(name) is not None
    }
    return Member(model=model, key=key, options=dict(options), **settings)


def parse(name: str, text: str) -> Balancer:
    "Parse a YAML (or JSON) definition; an error says which kind it declares, where it does."
    data = load_yaml(text)
    try:
        return from_dict(name, data)
    except ConfigError as ex:
        ex.kind = declared_kind(data)
        raise


def load_yaml(text: str):
    """YAML (or JSON) read within bounds: at most MAX_FILE_BYTES, no anchors or aliases (an
    alias chain expands a few hundred bytes into gigabytes), no duplicate keys."""
    import yaml

    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(_too_big(len(text)))
    # libyaml's loader, where PyYAML has it, is many times faster: every balancer file is
    # parsed by each llm process that looks up a model.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return loader.construct_document(node)
    except yaml.YAMLError as ex:
        mark = getattr(ex, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(ex, "problem", None) or "not valid YAML"
        raise ConfigError(f"not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError, RecursionError, TypeError) as ex:
        # a value PyYAML cannot build: a date like 2001-13-45, an integer of 5,000 digits
        raise ConfigError(f"a value cannot be read: {cut(str(ex), 100)}") from None
    finally:
        loader.dispose()


def _too_big(size: int) -> str:
    return (
        f"the definition is {size:,} bytes: a balancer file is at most {MAX_FILE_BYTES:,} bytes "
        f"(and {MAX_MEMBERS} members)"
    )


def _check_nodes(root) -> None:
    "Refuse aliases (a node reached twice) and duplicate keys, visiting each node once."
    import yaml

    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            raise ConfigError(
                "YAML anchors and aliases (&name, *name) are not allowed in a balancer file: "
                "write each value out"
            )
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        raise ConfigError(
                            f"duplicate key {shown(key.value)} (line {key.start_mark.line + 1}): "
                            "each key may appear once"
                        )
                    keys.add(key.value)
                todo.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def load(name: str, path: Path | None = None) -> Balancer:
    "Read a saved balancer; a problem is reported with the file's path."
    path = path or path_for(name)
    try:
        # O_NONBLOCK: a FIFO put where a file should be must not hang the reader; O_BINARY:
        # Windows' text mode would end the file at a Ctrl-Z byte
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        # (4 tries, 70 ms at most: every llm command reads the files, one that cannot be read
        # included)
        fd = retry_while_in_use(os.open, path, flags, tries=4)
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{path}: not a regular file")
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"no load balancer named {name!r}: 'llm lb list' shows the saved ones")
    except OSError as ex:
        raise Unreadable(f"{path}: cannot be read: {ex.strerror or ex}")
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(_too_big(os.path.getsize(path)))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                "cannot be read: it is not UTF-8 text ('llm lb edit' opens it to fix)"
            ) from None
        balancer = parse(name, text)
    except ConfigError as ex:
        raise ConfigError(f"{path}: {ex}", ex.kind) from None
    return dataclasses.replace(balancer, user_dir=str(Path(path).parent.parent))


def dump(balancer: Balancer) -> str:
    import yaml

    return yaml.safe_dump(balancer.to_dict(), sort_keys=False)


def write(balancer: Balancer) -> Path:
    return write_text(balancer.name, dump(balancer))


def write_text(name: str, text: str) -> Path:
    """Write atomically: a temporary file in the same folder, then os.replace. UTF-8 with the
    text's own line ends, on every system (Windows' text mode would write each "\n" as
    "\r\n", and in its code page)."""
    path = path_for(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        retry_while_in_use(os.replace, tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def retry_while_in_use(operation, *args, tries: int = 8, pause=time.sleep):
    """``operation(*args)`` (os.replace, os.unlink, os.open). On Windows a file another
    process has open (an llm reading its balancers, a virus scanner) cannot be replaced or
    removed (PermissionError) for that moment, nor opened while one replaces it: tried again,
    10 ms later and doubling (8 tries: about 1.3 s in all). Elsewhere once."""
    delay = 0.01
    for _ in range(tries - 1 if WINDOWS else 0):
        try:
            return operation(*args)
        except PermissionError:
            pause(delay)
            delay *= 2
    return operation(*args)
