"""The documentation against the code, in the spirit of sqlite-utils' test_docs.py: README.md
(also the PyPI page) keeps the essentials and docs/*.md the depth, and neither may drift from
what `llm lb` is. Every option of every `llm lb` command is documented, every `llm lb save`
example saves, the README stays short, and every relative link resolves."""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import llm
import pytest
import yaml
from conftest import invoke, set_keys
from llm.cli import cli

from llm_loadbalancer import config
from llm_loadbalancer.commands import lb

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MOST_BYTES = 15_360  # comparable llm plugins' READMEs are about 11 KB

# `llm lb` is registered with llm as a lazy command (llm_loadbalancer/__init__.py) that builds
# the real click group, llm_loadbalancer.commands.lb, only when it runs: its commands and their
# options are read from that group.
COMMANDS = sorted(lb.commands.items())
OPTIONS = [
    (name, opt)
    for name, command in COMMANDS
    for param in command.params
    if isinstance(param, click.Option)
    for opt in (*param.opts, *param.secondary_opts)
]


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _all_text() -> str:
    return "\n".join(page.read_text(encoding="utf-8") for page in PAGES)


def test_lb_is_registered_with_llm():
    assert "lb" in cli.commands


@pytest.mark.parametrize("name", [name for name, _ in COMMANDS])
def test_command_in_readme(name):
    "Every `llm lb` command has its example in the README."
    assert f"llm lb {name}" in README.read_text(encoding="utf-8")


@pytest.mark.parametrize("command,option", OPTIONS, ids=[f"{c} {o}" for c, o in OPTIONS])
def test_option_documented(command, option):
    "Every option of every `llm lb` command appears in README.md or docs/*.md."
    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", _all_text()), (
        f"llm lb {command} {option} is documented in neither README.md nor docs/"
    )


def test_readme_is_short():
    size = len(README.read_bytes())
    assert size <= README_MOST_BYTES, (
        f"README.md is {size:,} bytes, over {README_MOST_BYTES:,}: move depth to docs/"
    )


# Relative links, and their anchors


def _prose(text: str) -> str:
    "The text without fenced code blocks and inline code, where brackets are not links."
    text = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _links(page: Path) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text(encoding="utf-8")))


def _slug(heading: str) -> str:
    "GitHub's anchor for a heading."
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


RELATIVE_LINKS = [
    (page, link)
    for page in PAGES
    for link in _links(page)
    if not re.match(r"[a-z][a-z0-9+.-]*:", link)  # https:, mailto:
]


@pytest.mark.parametrize(
    "page,link", RELATIVE_LINKS, ids=[f"{_rel(p)} -> {link}" for p, link in RELATIVE_LINKS]
)
def test_relative_link_resolves(page, link):
    path, _, anchor = link.partition("#")
    target = (page.parent / path).resolve() if path else page
    assert target.exists(), f"{_rel(page)} links to {link}, which does not exist"
    if anchor:
        assert target.suffix == ".md", f"{_rel(page)}: an anchor into {link}"
        assert anchor in _anchors(target), f"{_rel(page)}: {link}: no heading has that anchor"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(README)}
    assert [_rel(page) for page in DOCS if page.resolve() not in linked] == []


# The `llm lb save` examples, and the balancer files shown


@dataclass
class Example:
    page: Path
    line: int
    text: str  # the command, continuation lines joined; or a balancer file (YAML)

    def __str__(self):
        return f"{_rel(self.page)}:{self.line}"


def _fenced_blocks(page: Path):
    "(info string, first line number, lines) of each fenced code block."
    block = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        if block is None:
            if stripped.startswith("```"):
                block = (stripped[3:].strip(), number + 1, [], len(line) - len(line.lstrip()))
        elif stripped.startswith("```"):
            yield block[:3]
            block = None
        else:
            block[2].append(line[block[3] :])  # a block in a list item is indented


def _save_commands(page: Path) -> list[Example]:
    found = []
    for _, first, lines in _fenced_blocks(page):
        index = 0
        while index < len(lines):
            number, text = first + index, lines[index]
            while text.endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text[:-1] + " " + lines[index].strip()
            index += 1
            text = text.strip().removeprefix("$ ")
            if text.startswith("llm lb save "):
                found.append(Example(page, number, text))
    return found


def _balancer_files(page: Path) -> list[Example]:
    return [
        Example(page, first, "\n".join(lines) + "\n")
        for info, first, lines in _fenced_blocks(page)
        if info in ("yaml", "yml") and any(line.startswith("members:") for line in lines)
    ]


# An example that keeps its state in Redis would reach for the server it names
# (redis://cache.internal:6379/0): those are skipped here. Saving with a Redis state is tested
# against a real redis-server in test_redis.py.
def _uses_redis(example: Example) -> bool:
    return re.search(r"\brediss?://", example.text) is not None


SAVES = [e for page in PAGES for e in _save_commands(page) if not _uses_redis(e)]
FILES = [e for page in PAGES for e in _balancer_files(page) if not _uses_redis(e)]

# What an example's `--file PATH` reads, when the page does not show it: a plain balancer.
PLAIN_FILE = "members:\n  - model: echo\n  - model: echo\n    options:\n      example_bool: true\n"


class StandIn(llm.Model):
    "A chat model the examples name that is not installed here."

    can_stream = True
    needs_key = None

    class Options(llm.Options):
        model_config = {"extra": "allow"}  # any option the example gives it

    def __init__(self, model_id):
        self.model_id = model_id

    def execute(self, prompt, stream, response, conversation=None):
        yield "stand-in"


class StandInEmbedding(llm.EmbeddingModel):
    "An embedding model the examples name that is not installed here."

    needs_key = None

    def __init__(self, model_id):
        self.model_id = model_id

    def embed_batch(self, items):
        for _ in items:
            yield [0.0, 1.0]


class StandIns:
    def __init__(self, chat, embedding):
        self.chat, self.embedding = sorted(chat), sorted(embedding)

    @llm.hookimpl
    def register_models(self, register):
        for model_id in self.chat:
            register(StandIn(model_id))

    @llm.hookimpl
    def register_embedding_models(self, register):
        for model_id in self.embedding:
            register(StandInEmbedding(model_id))


def _installed(model_id: str, embedding: bool) -> bool:
    try:
        (llm.get_embedding_model if embedding else llm.get_model)(model_id)
    except llm.UnknownModelError:
        return False
    return True


@pytest.fixture
def stand_ins():
    """stand_ins(models, keys, embedding): installs a stand-in for each model that is not
    installed, and stores each key name (with a made-up value)."""
    from llm.plugins import pm

    def install(models, keys, embedding, user_path):
        missing = {model for model in models if not _installed(model, embedding)}
        pm.register(
            StandIns(set() if embedding else missing, missing if embedding else set()),
            name="lb-docs-stand-ins",
        )
        set_keys(user_path, **{key: f"sk-{key}" for key in keys})

    yield install
    if pm.has_plugin("lb-docs-stand-ins"):
        pm.unregister(name="lb-docs-stand-ins")


@pytest.mark.parametrize("example", SAVES, ids=str)
def test_save_example(example, stand_ins, user_path, tmp_path, monkeypatch):
    "Every `llm lb save` example in the README and docs/ saves, as a user would type it."
    words = shlex.split(example.text, comments=True)
    assert words[:3] == ["llm", "lb", "save"], example.text
    args = words[3:]
    params = lb.commands["save"].make_context("save", list(args), resilient_parsing=True).params
    members = [config.parse_member_spec(spec) for spec in params["members"]]
    monkeypatch.chdir(tmp_path)
    if params["file_"] not in (None, "-"):
        Path(params["file_"]).write_text(PLAIN_FILE)
    keys = {member.key for member in members if member.key} | {params["state_key"]} - {None}
    stand_ins([m.model for m in members], keys, params["embedding"], user_path)
    result = invoke("lb", "save", *args)
    assert result.exit_code == 0, f"{example}: {example.text}\n{result.output}"
    assert "Saved load balancer lb:" in result.output


@pytest.mark.parametrize("example", FILES, ids=str)
def test_balancer_file(example, stand_ins, user_path):
    "Every balancer file shown in the README and docs/ saves with `llm lb save NAME --file -`."
    data = yaml.safe_load(example.text)
    members = data["members"]
    keys = {m["key"] for m in members if m.get("key")} | {data.get("state_key")} - {None}
    embedding = data.get("kind") == "embedding"
    stand_ins([m["model"] for m in members], keys, embedding, user_path)
    result = invoke("lb", "save", "shown", "--file", "-", input=example.text)
    assert result.exit_code == 0, f"{example}:\n{example.text}\n{result.output}"


def test_examples_are_found():
    "The collection above finds the examples (a change of format would silently skip them)."
    assert any(e.page == README for e in SAVES) and any(e.page != README for e in SAVES)
    assert len(SAVES) >= 5 and len(FILES) >= 2
