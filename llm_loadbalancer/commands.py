"""The ``llm lb`` command group: define, inspect, edit and reset load balancers."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import errno
import importlib.util
import json
import os
import re
import sys
import tempfile

import click
import llm
from click_default_group import DefaultGroup

from . import config, store
from .config import CHAT, EMBEDDING, Balancer, ConfigError
from .members import (
    Catalog,
    check_balancer,
    check_saved,
    load_stored_keys,
    model_of,
    typed_options,
)


def _fail(ex: Exception):
    raise click.ClickException(str(ex))


def _name(name: str, saved: bool = True) -> str:
    """A name given to a command, checked. ``saved``: the name of a saved balancer, as its file
    spells it when the name given differs from it only in case (on macOS and Windows the two
    are one file: the state is kept under the file's spelling)."""
    if name.startswith(config.PREFIX):
        raise click.ClickException(
            f"invalid load balancer name {name!r}: give the name without 'lb:' "
            f"(llm lb save {name[len(config.PREFIX) :] or 'NAME'} ...)"
        )
    try:
        config.check_name(name)
    except ConfigError as ex:
        _fail(ex)
    if not saved:
        return name
    same = config.same_but_case(name)
    return same if same is not None else name


def _load(name: str) -> Balancer:
    name = _name(name)
    try:
        return config.load(name)
    except ConfigError as ex:
        _fail(ex)


class _Group(DefaultGroup):
    """``llm lb``: with no command, ``list``; a mistyped command is an error (not arguments for
    ``list``); and every problem, whatever the state of the folder, the files, the editor or
    the state file, ends in one line: ``Error: ...``, never a traceback."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and name not in self.commands and not name.startswith("-"):
            close = difflib.get_close_matches(name, list(self.commands), n=1)
            hint = f"did you mean 'llm lb {close[0]}'?" if close else "'llm lb --help' lists them"
            raise click.ClickException(f"no command 'llm lb {config.cut(name)}': {hint}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConfigError, store.StateUnavailable) as ex:
            raise click.ClickException(str(ex)) from None
        except BrokenPipeError:
            raise  # the reader stopped (llm lb stats | head): click ends quietly
        except OSError as ex:
            if config.WINDOWS and ex.errno == errno.EINVAL and _output_gone():
                # how Windows says the reader of the output stopped (llm lb list | ...)
                raise BrokenPipeError(errno.EPIPE, "the reader stopped") from None
            raise click.ClickException(_os_problem(ex)) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as ex:  # the last guard: one line, never a traceback
            raise click.ClickException(
                config.cut(f"unexpected {type(ex).__name__}: {ex}", 300)
            ) from None


def _output_gone() -> bool:
    """Whether the output cannot be written any more (its reader stopped): what is left of it
    cannot be flushed either. Then nothing more is written to it, at exit neither."""
    try:
        sys.stdout.flush()
    except OSError:
        sys.stdout = open(os.devnull, "w")
        return True
    return False


def _os_problem(ex: OSError) -> str:
    where = f"{ex.filename}: " if ex.filename else ""
    return (
        f"{where}{ex.strerror or ex}: check that {llm.user_dir() / 'loadbalancers'} is a folder "
        "you can write to"
    )


@click.group(cls=_Group, default="list", default_if_no_args=True)
def lb():
    """
    Manage load balancers: lb:NAME models that spread prompts over several members

    \b
    Examples:
        llm lb save fast 'gpt-4o-mini key=work' 'gpt-4o-mini key=personal' claude-3.5-haiku
        llm -m lb:fast 'write me a haiku'
        llm lb list
        llm lb stats fast
    """


@lb.command(name="save")
@click.argument("name")
@click.argument("members", nargs=-1)
@click.option(
    "file_",
    "--file",
    metavar="PATH",
    help="Read the definition (YAML or JSON) from a file, - for stdin",
)
@click.option("--policy", help=f"How members are chosen: {', '.join(config.POLICIES)}")
@click.option(
    "--sticky/--no-sticky",
    default=None,
    help="Keep each conversation on the member that answered its first turn",
)
@click.option(
    "--failover/--no-failover",
    default=None,
    help="Try the next member when one fails before answering (default: on)",
)
@click.option(
    "--cooldown",
    type=float,
    metavar="SECONDS",
    help="Skip a member for this long after a 429, 5xx or connection error (default: 30)",
)
@click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    help="Abandon a member that gives no first chunk in this time and try the next (default: none)",
)
@click.option(
    "--max-wait",
    type=float,
    metavar="SECONDS",
    help="When every member is at its limit, wait this long at most for one (default: 30)",
)
@click.option(
    "--quota-cooldown",
    type=float,
    metavar="SECONDS",
    help="Skip a member whose quota is exhausted for this long (default: 3600)",
)
@click.option(
    "--affinity",
    type=float,
    metavar="SECONDS",
    help="Send a prompt whose system prompt, fragments and attachments make a long prefix "
    "(4 KB or more) to the member that served it in the last SECONDS, where the provider "
    "may still have it cached (default: 0, off)",
)
@click.option(
    "--state",
    metavar="URL",
    help="Keep its state in this Redis server (redis://host:6379/0), shared by every machine "
    "using it; local for this machine's file (default: $LLM_LOADBALANCER_STATE, else local)",
)
@click.option(
    "--state-key",
    metavar="NAME",
    help="The stored key (llm keys set NAME) holding the Redis server's password",
)
@click.option(
    "--embedding",
    is_flag=True,
    help="The members are embedding models (one model, several keys): lb:NAME is an "
    "embedding model, for llm embed and llm embed-multi",
)
@click.option("--force", is_flag=True, help="Replace an existing load balancer")
def lb_save(
    name,
    members,
    file_,
    policy,
    sticky,
    failover,
    cooldown,
    timeout,
    max_wait,
    quota_cooldown,
    affinity,
    state,
    state_key,
    embedding,
    force,
):
    """
    Save a load balancer from two or more members

    A MEMBER is a model id or alias, optionally followed (in the same quoted argument) by
    name=value settings: key=NAME names a key stored with 'llm keys set NAME'; weight=N is
    its share of the rotation; rpm, rpd, tpm, tpd are at most that many requests or tokens
    a minute or a day; any other name is an option for that member's model (options.NAME=...
    for an option named like one of those settings).

    \b
    Examples:
        llm lb save fast 'gpt-4o-mini key=work' 'gpt-4o-mini key=personal temperature=0.2' claude-3.5-haiku
        llm lb save backup gpt-4o claude-3.5-sonnet --policy failover
        llm lb save free 'gemini-2.5-flash key=a rpm=10' 'gemini-2.5-flash key=b rpm=10 weight=2'
        llm lb save team --file team.yaml
        llm lb save pick          # on a terminal: choose members from a numbered list
        llm lb save docs --embedding '3-small key=work' '3-small key=personal'
    """
    _name(name, saved=False)
    same = config.same_but_case(name)
    if same is not None:
        raise click.ClickException(
            f"lb:{same} is saved, and on macOS and Windows lb:{name} would be the same file: "
            f"use the name {same} (llm lb save {same} ... --force replaces it) or another"
        )
    if file_ is not None and members:
        raise click.ClickException("give members on the command line or --file, not both")
    kind = EMBEDDING if embedding else None  # None: the file's kind, or chat
    catalog = Catalog.installed(kind or CHAT)
    try:
        if file_ is not None:
            balancer = config.parse(name, _read_file(file_))
            if len(balancer.members) < 2:
                raise ConfigError("a load balancer needs at least 2 members")
        else:
            specs = members or _ask_members(catalog)
            parsed = [typed_options(config.parse_member_spec(spec), catalog) for spec in specs]
            if len(parsed) < 2:
                raise ConfigError(
                    "a load balancer needs at least 2 members: "
                    f"llm lb save {name} MODEL MODEL [MODEL ...]"
                )
            balancer = config.from_dict(name, {"members": [m.to_dict() for m in parsed]})
        balancer = _with_flags(
            balancer,
            kind=kind,
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
        )
        found = check_balancer(balancer, catalog)
        path = config.path_for(name)
        if path.exists() and not force:
            raise click.ClickException(f"lb:{name} already exists: add --force to replace it")
        _same_model_as_before(balancer, found)
        _check_state(balancer)
    except ConfigError as ex:
        _fail(ex)
    old = _previous(name)
    config.write(balancer)
    _tell_the_state(old, balancer)
    click.echo(
        f"Saved load balancer lb:{name} with {_count(len(balancer.members), 'member')}", err=True
    )


def _previous(name: str) -> Balancer | None:
    "The definition saved under the name, if there is a valid one."
    try:
        return config.load(name) if config.path_for(name).exists() else None
    except ConfigError:
        return None


def _tell_the_state(old: Balancer | None, new: Balancer | None) -> None:
    """A definition saved: its limits are declared for their keys, and what the definition it
    replaced kept is forgotten (not the keys' windows: they belong to the keys)."""
    if new is None:
        return
    try:
        store.saved(new, old)
    except store.StateUnavailable as ex:
        _warn(
            new.name,
            f"the state could not be updated ({_state_problem(ex)}); the old definition's "
            f"rotation and statistics stay until 'llm lb reset {new.name}', and its limits "
            "apply to other balancers from its first prompt",
        )


def _warn(name: str, message: str) -> None:
    click.echo(f"Warning: lb:{name}: {message}", err=True)


def _state_problem(ex: Exception) -> str:
    "What went wrong with the state, as a message says it."
    return _unreachable(ex) if isinstance(ex, store.Unreachable) else str(ex)


def _check_state(balancer: Balancer) -> None:
    "A Redis state needs redis-py, and its password key must be stored."
    if store.location(balancer)[0] is None:
        return
    if balancer.state_key and balancer.state_key not in load_stored_keys():
        # the value is not repeated: it may be the password itself
        raise ConfigError(
            "state_key is not the name of a stored key: store the Redis password with "
            "'llm keys set NAME' and give that NAME"
        )
    if importlib.util.find_spec("redis") is None:
        raise ConfigError(
            "a Redis state needs redis-py: pip install 'llm-loadbalancer[redis]' "
            "(or llm install 'llm-loadbalancer[redis]')"
        )


def _count(number: int, noun: str) -> str:
    plural = "es" if noun.endswith(("ch", "x")) else "s"
    return f"{number} {noun}{'' if number == 1 else plural}"


def _same_model_as_before(balancer: Balancer, found) -> None:
    """An embedding balancer saved again keeps its model: the collections made with lb:NAME
    hold that model's vectors, and another model's cannot be compared with them."""
    if balancer.kind != EMBEDDING or not config.path_for(balancer.name).exists():
        return
    try:
        old = config.load(balancer.name)
        if old.kind != EMBEDDING:
            return
        before = model_of(check_balancer(old, Catalog.installed(EMBEDDING))[0]).model_id
    except ConfigError:  # a broken file, or one whose model is gone: nothing to compare with
        return
    now = model_of(found[0]).model_id
    if now != before:
        raise ConfigError(
            f"lb:{balancer.name} embeds with {before}, and the collections made with it hold "
            f"its vectors, which vectors of {now} cannot be compared with: save {now} under "
            f"another name, or remove lb:{balancer.name} first (llm lb remove {balancer.name})"
        )


def _read_file(file_: str) -> str:
    source = "standard input" if file_ == "-" else file_
    try:
        if file_ == "-":
            data = sys.stdin.buffer.read(config.MAX_FILE_BYTES + 1)
        else:
            with open(file_, "rb") as handle:
                data = handle.read(config.MAX_FILE_BYTES + 1)
    except OSError as ex:
        raise ConfigError(f"cannot read {source}: {ex.strerror or ex}")
    if len(data) > config.MAX_FILE_BYTES:
        raise ConfigError(
            f"{source} is over {config.MAX_FILE_BYTES:,} bytes, the most a balancer file may be"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text: give a YAML or JSON file") from None


def _with_flags(balancer: Balancer, **flags) -> Balancer:
    "The definition with the fields that options on the command line set."
    data = balancer.to_dict()
    data.update({field: value for field, value in flags.items() if value is not None})
    return config.from_dict(balancer.name, data)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _ask_members(catalog: Catalog) -> list[str]:
    "On a terminal, choose members from the installed models (of the catalog's kind)."
    if not _stdin_is_terminal():
        raise ConfigError(
            "no members given: name at least 2 models (llm lb save NAME MODEL MODEL), "
            "or use --file; choosing from a list needs a terminal"
        )
    ids = list(
        dict.fromkeys(
            mwa.model.model_id
            for mwa in catalog.by_name.values()
            if mwa.model and not mwa.model.model_id.startswith(config.PREFIX)
        )
    )
    for number, model_id in enumerate(ids, 1):
        click.echo(f"{number:>3}. {model_id}", err=True)
    answer = click.prompt(
        "Members (numbers separated by spaces or commas; a model may be listed twice)",
        err=True,
    )
    chosen = []
    for word in answer.replace(",", " ").split():
        if not word.isdigit() or not 1 <= int(word) <= len(ids):
            raise ConfigError(f"{word!r} is not a number from 1 to {len(ids)}")
        chosen.append(ids[int(word) - 1])
    return chosen


def _check_saved(balancer: Balancer, catalog: Catalog, keys: dict | None = None) -> list[str]:
    """Check a saved balancer's members as prompting it does; a problem names the file, like a
    parse error does. Returns the members that are not installed, which prompts skip."""
    try:
        _, missing = check_saved(balancer, catalog, load_stored_keys() if keys is None else keys)
    except ConfigError as ex:
        raise ConfigError(f"{config.path_for(balancer.name)}: {ex}") from None
    return [f"{problem}: skipped until it is installed" for problem in missing.values()]


def _printed_json_or_nothing(rows: list, json_: bool) -> bool:
    "Print the rows as JSON, or that none are saved: True when that is all there is to print."
    if json_:
        click.echo(json.dumps(rows, indent=2))
        return True
    if not rows:
        click.echo("No load balancers saved")
        return True
    return False


def _summary(balancer: Balancer, keys: dict) -> dict:
    data = {"name": balancer.name, "model_id": balancer.model_id, "kind": balancer.kind}
    data.update(balancer.to_dict())
    data["state_lives"] = store.where(balancer, keys)
    if balancer.state:
        data["state"] = config.shown_url(balancer.state)
    return data


def _stricter_limits(balancers: list[Balancer]) -> dict[str, list[dict]]:
    """A limit belongs to the provider's bucket (a model and a key) in one state: where another
    saved member using the bucket gives a stricter limit than a member's own (or one it lacks),
    that one applies to it (``rules.strictest``, as the store applies it; the store also
    forgets a limit no process has used for a day). {balancer name: [{member, limits,
    given_by}]}"""
    import time

    from .store import rules

    now = time.time()
    given: dict[tuple, list] = {}  # (where the state is, bucket): [(declaration, model id)]
    for balancer in balancers:
        place = store.location(balancer)[0]
        for member in balancer.members:
            if member.limits:
                declared = (*rules.declaration(member.limits), now, balancer.model_id)
                given.setdefault((place, rules.bucket(member)), []).append(declared)
    found: dict[str, list[dict]] = {}
    for balancer in balancers:
        place = store.location(balancer)[0]
        for index, member in enumerate(balancer.members):
            declared = given.get((place, rules.bucket(member)), [])
            applies = rules.strictest(member.limits, declared, now)
            stricter = {
                name: value for name, value in applies.items() if member.limits.get(name) != value
            }
            if stricter:
                by = {
                    row[-1]
                    for row in declared
                    for name, value in zip(config.LIMITS, row)
                    if value is not None and stricter.get(name) == value
                }
                found.setdefault(balancer.name, []).append(
                    {"member": index + 1, "limits": stricter, "given_by": sorted(by)}
                )
    return found


@lb.command(name="list")
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def lb_list(json_):
    """
    List saved load balancers

    \b
    Example:
        llm lb list
    """
    for skipped in config.skipped():
        click.echo(f"Warning: skipped {skipped}", err=True)
    names = config.names()
    catalog = Catalog.installed() if names else None
    keys = load_stored_keys() if names else {}
    rows = []  # (JSON row, balancer or None)
    for name in names:
        try:
            balancer = config.load(name)
            warnings = _check_saved(balancer, catalog, keys)
        except ConfigError as ex:
            rows.append(({"name": name, "model_id": f"lb:{name}", "error": str(ex)}, None))
        else:
            row = _summary(_without_unstored_keys(balancer, keys), keys)
            if warnings:
                row["warnings"] = warnings
            rows.append((row, balancer))
    stricter = _stricter_limits([balancer for _, balancer in rows if balancer is not None])
    for row, balancer in rows:
        if balancer is not None and balancer.name in stricter:
            row["stricter_limits"] = stricter[balancer.name]
    if _printed_json_or_nothing([row for row, _ in rows], json_):
        return
    width = max(len(row["model_id"]) for row, _ in rows)
    for row, balancer in rows:
        if balancer is None:
            click.echo(f"{row['model_id']:<{width}}  error: {row['error']}")
            continue
        labels = ", ".join(member.label() for member in balancer.members)
        kind = "embeddings, " if balancer.kind == EMBEDDING else ""
        click.echo(f"{row['model_id']:<{width}}  {kind}{balancer.policy}  {labels}")
        if store.location(balancer)[0] is not None:
            click.echo(f"{'':<{width}}  state: {row['state_lives']}")
        for warning in row.get("warnings", ()):
            click.echo(f"{'':<{width}}  warning: {warning}")
        for found in row.get("stricter_limits", ()):
            index = found["member"] - 1
            applies = ", ".join(f"{name}={value}" for name, value in found["limits"].items())
            click.echo(
                f"{'':<{width}}  note: {balancer.members[index].describe(index + 1, keys)}: "
                f"{applies} applies, the strictest given for its model and key (by "
                f"{', '.join(found['given_by'])})"
            )


@lb.command(name="show")
@click.argument("name")
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def lb_show(name, json_):
    """
    Show a load balancer's definition

    \b
    Example:
        llm lb show fast
    """
    balancer = _load(name)
    keys = load_stored_keys()
    try:
        warnings = _check_saved(balancer, Catalog.installed(), keys)
    except ConfigError as ex:
        warnings = [str(ex)]
    for warning in warnings:
        click.echo(f"Warning: lb:{name}: {warning}", err=True)
    balancer = _without_unstored_keys(balancer, keys)
    if json_:
        click.echo(json.dumps(_summary(balancer, keys), indent=2))
    else:
        click.echo(config.dump(balancer), nl=False)


def _without_unstored_keys(balancer: Balancer, keys: dict) -> Balancer:
    "A key that is not a stored key's name may be a pasted secret: it is never printed."
    members = tuple(
        dataclasses.replace(member, key="(not a stored key name)")
        if member.key and member.key not in keys
        else member
        for member in balancer.members
    )
    shared = {}
    if balancer.state_key and balancer.state_key not in keys:
        shared["state_key"] = "(not a stored key name)"
    if balancer.state and balancer.state != config.shown_url(balancer.state):
        shared["state"] = config.shown_url(balancer.state)
    return dataclasses.replace(balancer, members=members, **shared)


@lb.command(name="remove")
@click.argument("name")
def lb_remove(name):
    """
    Remove a load balancer

    \b
    Example:
        llm lb remove fast
    """
    name = _name(name)
    path = config.path_for(name)
    if not path.exists():
        raise click.ClickException(f"no load balancer named {name!r}: 'llm lb list' shows them")
    try:
        balancer = config.load(name)
    except ConfigError:
        balancer = None
    config.retry_while_in_use(os.unlink, path)
    try:
        store.remove(name, balancer)
    except store.StateUnavailable as ex:
        _warn(
            name,
            f"its state could not be cleared ({_state_problem(ex)}); its rotation and "
            "statistics stay there",
        )
    click.echo(f"Removed load balancer lb:{name}", err=True)


@lb.command(name="path")
def lb_path():
    """
    Output the folder that holds the load balancer files

    \b
    Example:
        llm lb path
    """
    click.echo(config.folder())


@lb.command(name="edit")
@click.argument("name")
def lb_edit(name):
    """
    Edit a load balancer's file in your editor

    The edited text is checked like 'llm lb save' does; an invalid edit is refused, the old
    file kept, and the edited text kept in a temporary file that the error names.

    \b
    Example:
        EDITOR=nano llm lb edit fast
    """
    name = _name(name)
    path = config.path_for(name)
    if not path.exists():
        # Only existence is checked: edit is how a broken file gets fixed.
        raise click.ClickException(f"no load balancer named {name!r}: 'llm lb list' shows them")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="backslashreplace")
        click.echo(
            f"lb:{name}: the file is not UTF-8 text: the bytes that are not are shown as \\xNN; "
            "it is saved once what you write is a valid balancer",
            err=True,
        )
    old = _previous(name)
    edited = _edit_in_editor(name, text)
    if edited is None:
        click.echo(f"No changes to lb:{name}", err=True)
        return
    _tell_the_state(old, _previous(name))
    click.echo(f"Saved load balancer lb:{name}", err=True)


def _edit_in_editor(name: str, text: str) -> str | None:
    """Open ``text`` in the user's editor, in a temporary file; save it as the balancer if it is
    valid. Returns None when nothing changed. When it cannot be saved, the temporary file is
    kept, and the error says where, so that no edit is lost."""
    fd, edit_path = tempfile.mkstemp(prefix="llm-lb-edit-", suffix=".yaml")
    # (newline="": the text as it is, not Windows' "\r\n" for each "\n")
    with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
        handle.write(text)
    keep = True
    try:
        try:
            click.edit(filename=edit_path)
        except click.ClickException as ex:
            raise ConfigError(
                f"lb:{name} was not changed: {ex.message} (the text is in {edit_path})"
            ) from None
        try:
            with open(edit_path, "rb") as handle:
                data = handle.read(config.MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            keep = False
            raise ConfigError(f"lb:{name} was not changed: the editor removed the file it edited")
        try:
            edited = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"lb:{name} was not changed: the edited text is not UTF-8; it is in {edit_path}"
            ) from None
        if edited == text:
            keep = False
            return None
        try:
            balancer = config.parse(name, edited)
            _same_model_as_before(balancer, check_balancer(balancer, Catalog.installed()))
            config.write_text(name, edited)
        except (ConfigError, OSError) as ex:
            problem = _os_problem(ex) if isinstance(ex, OSError) else str(ex)
            raise ConfigError(
                f"lb:{name} was not changed: {problem} (your edited text is in {edit_path})"
            ) from None
        keep = False
        return edited
    finally:
        if not keep:
            try:
                os.unlink(edit_path)
            except OSError:
                pass


@lb.command(name="reset")
@click.argument("name")
def lb_reset(name):
    """
    Start the rotation again at the first member; forget cooldowns and statistics

    \b
    Example:
        llm lb reset fast
    """
    balancer = _load(name)
    try:
        store.reset(balancer)
    except store.StateUnavailable as ex:
        raise click.ClickException(f"cannot reset lb:{name}: {_state_problem(ex)}")
    click.echo(f"Reset lb:{name}", err=True)


def _unreachable(ex: Exception) -> str:
    return f"its Redis state cannot be used: {ex}"


@lb.command(name="state")
@click.argument("name")
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def lb_state(name, json_):
    """
    Where a load balancer's state lives, and what is found there

    For a Redis server: connects, and reports the round trip, the server's version and what
    it holds for this definition of the balancer (its rotation, requests, cooldowns).

    \b
    Example:
        llm lb state team
    """
    balancer = _load(name)
    try:
        found = store.open_store(balancer, fallback=False).report(balancer)
    except store.Unreachable as ex:
        raise click.ClickException(f"lb:{name}: {_unreachable(ex)}")
    report = {"name": name, "state": store.where(balancer), **found}
    if json_:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"lb:{name}: {report['state']}")
    if "file" in found:
        click.echo(f"  file: {report['file']}")
        return
    click.echo(
        f"  reachable: Redis {found['redis_version']}, round trip "
        f"{found['round_trip'] * 1000:.2f} ms"
    )
    if not found["known"]:
        click.echo(f"  nothing stored yet for this definition (keys {found['prefix']}*)")
        return
    click.echo(
        f"  keys {found['prefix']}*: rotation at {found['position']}, "
        f"{_count(found['requests'], 'request')} recorded, "
        f"{_count(found['cooldowns'], 'cooldown')} on record"
    )


@lb.command(name="route")
@click.argument("name")
@click.argument("prompt", required=False)
@click.option("-s", "--system", help="The prompt's system prompt")
@click.option(
    "fragments", "-f", "--fragment", multiple=True, help="A fragment of the prompt, as llm -f"
)
@click.option(
    "system_fragments",
    "--sf",
    "--system-fragment",
    multiple=True,
    help="A fragment of its system prompt, as llm --sf",
)
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def lb_route(name, prompt, system, fragments, system_fragments, json_):
    """
    Which member the next prompt would go to, and why; and where each member stands

    Sends nothing and changes nothing: the rotation, limit windows and cooldowns stay as
    they were. Given a prompt (its text, -s, -f, --sf, as llm takes them), the choice also
    counts its estimated tokens against token limits and its prefix's affinity.

    \b
    Examples:
        llm lb route fast
        llm lb route docs -f docs/ -s 'You answer from the docs' 'how do I configure X?'
    """
    balancer = _load(name)
    keys = load_stored_keys()
    try:
        missing = check_saved(balancer, Catalog.installed(balancer.kind), keys)[1]
    except ConfigError as ex:
        _fail(ex)
    demand = prefix = None
    if prompt or system or fragments or system_fragments:
        if balancer.kind == EMBEDDING:
            raise click.ClickException(
                f"lb:{name} is an embedding balancer: route it without a prompt"
            )
        demand, prefix = _asked(balancer, prompt, system, fragments, system_fragments)
    try:
        found = store.open_store(balancer, fallback=False)
        route = found.route(
            balancer, unavailable=frozenset(missing), demand=demand, prefix=prefix
        )
        members = found.stats(balancer, now=route.now)
    except store.Unreachable as ex:
        raise click.ClickException(f"lb:{name}: {_unreachable(ex)}")
    except store.StateUnavailable as ex:
        raise click.ClickException(f"cannot read the state of lb:{name}: {ex}")
    report = {"name": name, "model_id": balancer.model_id, **_routed(balancer, route, keys)}
    if demand is not None:
        report["prompt"] = {"input_tokens": demand.input, "prefix": prefix}
    report["members"] = [
        _standing(index, balancer, route, members[index], missing, keys)
        for index in range(len(balancer.members))
    ]
    if json_:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{balancer.model_id}: {report['next_line']}")
    if demand is not None:
        held = f"; its prefix {prefix[:4]}…" if prefix else "; no long prefix"
        click.echo(f"  the prompt: about {demand.input:,} tokens of input{held}")
    for member in report["members"]:
        number, label, tier = member["member"], member["label"], member["tier"]
        click.echo(f"  {number}. {label}  tier {tier}  {member['line']}")


def _asked(balancer: Balancer, prompt, system, fragments, system_fragments):
    """What a prompt given to ``route`` asks of the balancer: its ``estimates.Demand`` (with
    each member's cap on its answer, as a prompt would have it) and its prefix's digest."""
    import sqlite_utils
    from llm.cli import FragmentNotFound, logs_db_path, resolve_fragments
    from llm.migrations import migrate

    from .delegate import Run

    try:
        db = sqlite_utils.Database(logs_db_path())
        migrate(db)  # (as llm does before it resolves fragments: their aliases live there)
        found = resolve_fragments(db, fragments)
        found_system = resolve_fragments(db, system_fragments)
    except FragmentNotFound as ex:
        raise click.ClickException(str(ex))
    model = llm.get_model(balancer.model_id)
    asked = llm.Prompt(
        prompt or "",
        model,
        system=system,
        fragments=found,
        system_fragments=found_system,
    )
    run = Run(model, asked, None, None)
    return run.demand, run.prefix


def _routed(balancer: Balancer, route, keys: dict) -> dict:
    "The next choice, as ``route`` says it: {next, wait, next_line}."
    plan = route.plan
    if plan.order:
        index = plan.order[0]
        member = balancer.members[index]
        why = re.sub(r", tier \d+", "", plan.why)
        line = f"next: {member.describe(index + 1, keys)}, tier {member.tier}, by {why}"
        chosen = {"member": index + 1, "tier": member.tier, "why": why}
        return {"next": chosen, "wait": None, "next_line": line}
    if plan.wait is not None:
        until, index = plan.wait
        first = balancer.members[index].describe(index + 1, keys)
        line = (
            "next: none now: every member is at its limit or inside a reset its provider "
            f"stated; the first to free up is {first}, at {_when(until)}"
        )
        return {"next": None, "wait": {"member": index + 1, "until": until}, "next_line": line}
    return {"next": None, "wait": None, "next_line": "next: none: no member is installed"}


def _standing(index: int, balancer: Balancer, route, stats: dict, missing, keys) -> dict:
    "Where one member stands: available, at its limit, cooling down, or not installed."
    from .store import rules

    member = balancer.members[index]
    found = {"member": index + 1, "label": member.label(keys), "tier": member.tier}
    reason = stats.get("cooling_down_for")
    until = None
    if index in missing:
        state, line = "not installed", "not installed"
    elif index in route.blocked and (reason or "").startswith(rules.PROBE_REASON):
        state, until = "being probed", route.blocked[index]
        line = f"being probed after its cooldown, until {_when(until)} at the latest"
    elif index in route.blocked:
        state, until = "inside a stated reset", route.blocked[index]
        line = f"inside a reset its provider stated, until {_when(until)} ({reason})"
    elif index in route.free:
        state, until = "at its limit", route.free[index]
        uses = ", ".join(map(_use, stats["limits"].items()))
        line = f"at its limit ({uses}), free again at {_when(until)}"
    elif index in route.cooling:
        state, until = "cooling down", route.cooling[index]
        line = f"cooling down until {_when(until)} ({reason})"
    else:
        state, line = "available", "available"
        if stats["limits"]:
            line += f" ({', '.join(map(_use, stats['limits'].items()))})"
    found.update(state=state, until=until, limits=stats["limits"], line=line)
    return found


@lb.command(name="stats")
@click.argument("name", required=False)
@click.option("json_", "--json", is_flag=True, help="Output as JSON")
def lb_stats(name, json_):
    """
    Requests, successes, failures and cooldowns per member

    For an embedding balancer, each request is one batch.

    \b
    Examples:
        llm lb stats
        llm lb stats fast --json
    """
    names = [_name(name)] if name else config.names()
    keys = load_stored_keys()
    result = []
    for each in names:
        try:
            balancer = config.load(each)
        except ConfigError as ex:
            if name:
                _fail(ex)
            continue
        try:
            found = store.open_store(balancer, fallback=False)
            members = found.stats(balancer)
            cached = found.affinity(balancer) if balancer.affinity else None
        except store.Unreachable as ex:
            problem = f"cannot read statistics of lb:{each}: {_unreachable(ex)}"
            if name:
                raise click.ClickException(problem)
            # the others are still worth showing
            result.append({"name": each, "model_id": balancer.model_id, "error": problem})
            continue
        except store.StateUnavailable as ex:
            raise click.ClickException(f"cannot read statistics: {ex}")
        for member, row in zip(balancer.members, members):
            row["label"] = member.label(keys)
        entry = {
            "name": each,
            "model_id": balancer.model_id,
            "kind": balancer.kind,
            "state": store.where(balancer, keys),
            "members": members,
        }
        if cached is not None:
            entry["affinity"] = {"seconds": balancer.affinity, **cached}
        if balancer.tiers is not None:  # the requests each tier served
            served: dict[str, int] = {}
            for member, row in zip(balancer.members, members):
                served[str(member.tier)] = served.get(str(member.tier), 0) + row["requests"]
            entry["tiers"] = dict(sorted(served.items(), key=lambda item: int(item[0])))
        result.append(entry)
    if _printed_json_or_nothing(result, json_):
        return
    for number, entry in enumerate(result):
        if number:
            click.echo()
        if "error" in entry:
            click.echo(f"{entry['model_id']}  error: {entry['error']}")
            continue
        shared = entry["state"] != store.LOCAL
        click.echo(entry["model_id"] + (f"  (state: {entry['state']})" if shared else ""))
        if "tiers" in entry:
            click.echo(
                "  "
                + "; ".join(
                    f"tier {tier}: {_count(count, 'request')}"
                    for tier, count in entry["tiers"].items()
                )
            )
        if "affinity" in entry:
            cached = entry["affinity"]
            click.echo(
                f"  affinity {cached['seconds']:g} s: {_count(cached['routed'], 'prompt')} sent "
                f"to the member that served their prefix; "
                f"{_count(cached['prefixes'], 'prefix')} held"
            )
        for member in entry["members"]:
            click.echo(_stats_line(member, entry["kind"]))


def _use(item) -> str:
    """A limit's use now, as ``stats`` shows it: ``tpm 150/300`` and, for tokens reserved by
    prompts in flight (not yet reported), ``(+150 in flight)``."""
    name, use = item
    text = f"{name} {use['used']:,}/{use['limit']:,}"
    if use.get("reserved"):
        text += f" (+{use['reserved']:,} in flight)"
    return text


def _when(timestamp) -> str:
    if not timestamp:
        return "never"
    try:
        return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "(a time out of range)"


BAR = 20


def _bar_marks() -> tuple[str, str]:
    """The bar's marks: "█" and "·", or "#" and "." where the output cannot carry them (on
    Windows, output to a file or a pipe is in the system's code page, which has no "█")."""
    try:
        "█·".encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "#", "."
    return "█", "·"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _stats_line(member: dict, kind: str = CHAT) -> str:
    """A member's statistics: a line with its share of traffic as a bar, then its details. An
    embedding balancer's requests are batches, and its members report no tokens."""
    filled = round(member["share"] * BAR)
    full, empty = _bar_marks()
    counts = f"{member['successes']} ok, {member['failures']} failed"
    if kind == EMBEDDING:
        counts = (
            f"{_count(member['requests'], 'batch')} ({_count(member['items'], 'item')}), {counts}"
        )
    else:
        counts = (
            f"{_count(member['requests'], 'request')}, {counts}; tokens "
            f"{member['input_tokens']:,} in, {member['output_tokens']:,} out"
        )
    lines = [
        f"  {member['member']}. {member['label']}  {full * filled}{empty * (BAR - filled)} "
        f"{member['share']:.0%} of traffic",
        f"{counts}; last used {_when(member['last_used'])}",
    ]
    timings = [
        f"{what} median {_duration(spread['median'])}, p95 {_duration(spread['p95'])}"
        for what, spread in (
            ("first chunk", member["first_chunk"]),
            ("total", member["total_time"]),
        )
        if spread
    ]
    if timings:
        lines.append("; ".join(timings))
    if member["limits"]:
        lines.append("limits now: " + ", ".join(map(_use, member["limits"].items())))
    if member["cooling_down_until"]:
        why = f" ({member['cooling_down_for']})" if member["cooling_down_for"] else ""
        lines.append(f"cooling down until {_when(member['cooling_down_until'])}{why}")
    if member["last_error"]:
        lines.append(f"last error: {member['last_error']}")
    return "\n     ".join(lines)
