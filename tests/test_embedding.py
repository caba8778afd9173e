"""Embedding balancers (issue 13): ``llm lb save NAME --embedding`` makes lb:NAME an embedding
model whose batches are spread over the keys of one model, with failover per batch.

Through llm's own OpenAI embedding models, over HTTP, to the local OpenAI-compatible server
(tests/local_openai.py), which answers /v1/embeddings with deterministic vectors and counts
what reached each key. llm builds those models' client with no base URL, so the openai SDK
reads OPENAI_BASE_URL: that is how they reach the local server (and the llm processes a test
starts inherit it). In this process (click's runner, llm's Python API), except where separate
processes are the point."""

import json
import subprocess
import sys
from collections import Counter
from typing import ClassVar

import llm
import pytest
import sqlite_utils
import yaml
from conftest import invoke, process_env, save_lb, set_keys, use_editor
from llm.plugins import pm
from local_openai import LocalOpenAI, vector

from llm_loadbalancer.delegate import LoadBalancerError

DOCS = ("3-small key=work", "text-embedding-3-small key=personal")  # one model, two keys


@pytest.fixture
def server(user_path, monkeypatch):
    "The local server; keys work, personal, and openai (the OpenAI models' default key)."
    local = LocalOpenAI().start()
    monkeypatch.setenv("OPENAI_BASE_URL", local.api_base("openai"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    set_keys(user_path, work="sk-work", personal="sk-personal", openai="sk-default")
    yield local
    local.stop()


def ok(*args, input=None):
    "An llm command in this process, which must succeed: what it printed."
    result = invoke(*args, input=input)
    assert result.exit_code == 0, result.output
    return result.stdout


def refused(*args):
    "An llm command that must fail with one line, 'Error: ...': that line."
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def items_file(path, count, prefix="item"):
    "A JSON file of ``count`` items {id, content} for llm embed-multi."
    rows = [{"id": f"{prefix}-{n}", "content": f"{prefix} number {n}"} for n in range(count)]
    path.write_text(json.dumps(rows))
    return rows


def stored(db_path, collection="docs") -> dict:
    "{id: vector} of a collection in an embeddings database."
    db = sqlite_utils.Database(db_path)
    return {
        row["id"]: list(llm.decode(row["embedding"]))
        for row in db.query(
            "select embeddings.id, embedding from embeddings join collections "
            "on collections.id = collection_id where collections.name = ?",
            [collection],
        )
    }


def member_stats(name):
    return json.loads(ok("lb", "stats", name, "--json"))[0]["members"]


# --- saving: what an embedding balancer is, and what it refuses ------------------------------


def test_an_embedding_balancer_is_listed_as_one(user_path, server):
    result = invoke("lb", "save", "docs", "--embedding", *DOCS)
    assert (result.exit_code, result.stderr) == (0, "Saved load balancer lb:docs with 2 members\n")
    assert (
        "LoadBalancerEmbedding: lb:docs (roundrobin: 3-small (key: work), "
        "text-embedding-3-small (key: personal))"
    ) in ok("embed-models").splitlines()
    assert "lb:docs" not in ok("models")
    save_lb("chat", "echo", "echo")
    assert ok("lb", "list") == (
        "lb:chat  roundrobin  echo, echo\n"
        "lb:docs  embeddings, roundrobin  3-small (key: work), "
        "text-embedding-3-small (key: personal)\n"
    )
    assert yaml.safe_load(ok("lb", "show", "docs")) == {
        "kind": "embedding",
        "policy": "roundrobin",
        "members": [
            {"model": "3-small", "key": "work"},
            {"model": "text-embedding-3-small", "key": "personal"},
        ],
    }
    assert json.loads(ok("lb", "show", "docs", "--json"))["kind"] == "embedding"
    assert [row["kind"] for row in json.loads(ok("lb", "list", "--json"))] == [
        "chat",
        "embedding",
    ]


def test_kind_embedding_in_a_file(user_path, server, tmp_path):
    path = tmp_path / "docs.yaml"
    path.write_text("kind: embedding\nmembers:\n- 3-small\n- model: 3-small\n  key: work\n")
    ok("lb", "save", "docs", "--file", str(path))
    assert llm.get_embedding_model("lb:docs").model_id == "lb:docs"
    path.write_text("kind: embeddings\nmembers: [3-small, 3-small]\n")
    assert refused("lb", "save", "typo", "--file", str(path)) == (
        "Error: unknown kind 'embeddings': use chat (the default) or embedding"
    )


@pytest.mark.parametrize(
    "members,problem",
    [
        (
            ("3-small", "3-large"),
            (
                "Error: member 2 (3-large): it embeds with text-embedding-3-large and member 1 with "
                "text-embedding-3-small: every member of an embedding balancer must be the same "
                "model (at the same dimensions), or the vectors in one collection could not be "
                "compared; balance several keys of one model instead"
            ),
        ),
        (
            ("3-small key=work", "3-small-512 key=personal"),
            (
                "Error: member 2 (3-small-512, key: personal): it embeds with "
                "text-embedding-3-small-512 and member 1 with text-embedding-3-small:"
            ),
        ),
        (
            ("3-small", "3-small dimensions=512"),
            (
                "Error: member 2 (3-small): embedding models take no options in llm (a model's "
                "dimensions are part of its id, e.g. text-embedding-3-small-512): remove dimensions"
            ),
        ),
        (
            ("3-small", "3-small tpm=1000"),
            (
                "Error: member 2 (3-small): tpm: embedding models do not tell llm how many tokens "
                "they used, so a token limit cannot be kept; limit requests (one per batch) with "
                "rpm or rpd"
            ),
        ),
        (
            ("3-small", "echo"),
            (
                "Error: member 2 (echo): echo is a chat model, not an embedding model: the members "
                "of an embedding balancer are embedding models ('llm embed-models' lists them)"
            ),
        ),
        (
            ("3-small", "lb:other"),
            (
                "Error: member 2 (lb:other): lb:other is a load balancer, and load balancers cannot "
                "contain other load balancers: list its members instead"
            ),
        ),
    ],
)
def test_members_that_would_not_give_comparable_vectors_are_refused(user_path, members, problem):
    set_keys(user_path, work="sk-work", personal="sk-personal")
    assert refused("lb", "save", "docs", "--embedding", *members).startswith(problem)
    assert not (user_path / "loadbalancers" / "docs.yaml").exists()


def test_an_embedding_model_in_a_chat_balancer_and_sticky_are_refused(user_path):
    assert refused("lb", "save", "chat", "echo", "3-small") == (
        "Error: member 2 (3-small): 3-small is an embedding model: a balancer of embedding "
        "models is saved with 'llm lb save NAME --embedding MODEL MODEL ...' (kind: embedding)"
    )
    assert refused("lb", "save", "docs", "--embedding", "--sticky", "3-small", "3-small") == (
        "Error: sticky keeps a conversation on one member, and an embedding balancer has no "
        "conversations: remove sticky"
    )
    affinity = ("--affinity", "60")
    assert refused("lb", "save", "docs", "--embedding", *affinity, "3-small", "3-small") == (
        "Error: affinity sends a long prompt prefix back to the member that cached it, and an "
        "embedding balancer has no prompts: remove affinity"
    )
    assert invoke("lb", "save", "docs", "--embedding", "3-small", "3-small").exit_code == 0
    assert refused("lb", "route", "docs", "some text") == (
        "Error: lb:docs is an embedding balancer: route it without a prompt"
    )


def test_saving_it_again_with_another_model_is_refused(user_path, tmp_path, monkeypatch):
    ok("lb", "save", "docs", "--embedding", "3-small", "3-small")
    problem = (
        "lb:docs embeds with text-embedding-3-small, and the collections made with it "
        "hold its vectors, which vectors of text-embedding-3-large cannot be compared with: "
        "save text-embedding-3-large under another name, or remove lb:docs first "
        "(llm lb remove docs)"
    )
    assert refused("lb", "save", "docs", "--force", "--embedding", "3-large", "3-large") == (
        f"Error: {problem}"
    )
    editor = tmp_path / "editor.py"  # an EDITOR that writes another model into the file
    editor.write_text(
        "import sys\nopen(sys.argv[-1], 'w').write('kind: embedding\\nmembers: [3-large]\\n')\n"
    )
    use_editor(monkeypatch, tmp_path, editor)
    assert refused("lb", "edit", "docs").startswith(f"Error: lb:docs was not changed: {problem}")
    assert "3-small" in ok("lb", "show", "docs")
    # another key, or the same model by another name, is fine; so is removing it first
    ok("lb", "save", "docs", "--force", "--embedding", "3-small", "text-embedding-3-small")
    ok("lb", "remove", "docs")
    ok("lb", "save", "docs", "--embedding", "3-large", "3-large")


# --- using it -------------------------------------------------------------------------------


def test_embed_multi_spreads_the_batches_and_embeds_every_item_once(user_path, server, tmp_path):
    save_lb("docs", *DOCS, flags=("--embedding",))
    rows = items_file(tmp_path / "items.json", 300)
    ok("embed-multi", "docs", str(tmp_path / "items.json"), "-m", "lb:docs", "--batch-size", "10")
    assert server.seen("key") == ["sk-work", "sk-personal"] * 15  # 30 batches, in turn
    assert Counter(text for _, text in server.embedded) == {row["content"]: 1 for row in rows}
    assert {body["model"] for body in server.seen("body")} == {"text-embedding-3-small"}
    vectors = stored(user_path / "embeddings.db")
    assert vectors == {row["id"]: vector(row["content"]) for row in rows}
    members = member_stats("docs")
    assert [(m["requests"], m["successes"], m["failures"]) for m in members] == [(15, 15, 0)] * 2
    assert [m["items"] for m in members] == [150, 150]  # 300 items, every one counted once
    assert "15 batches (150 items), 15 ok, 0 failed; last used" in ok("lb", "stats", "docs")


def test_batches_spread_exactly_over_two_keys_across_processes(user_path, server, tmp_path):
    save_lb("docs", *DOCS, flags=("--embedding",))
    jobs = []
    for name in ("one", "two"):
        items_file(tmp_path / f"{name}.json", 150, prefix=name)
        args = ["docs", str(tmp_path / f"{name}.json"), "-m", "lb:docs", "--batch-size", "10"]
        args += ["-d", str(tmp_path / f"{name}.db")]  # two writers, two databases
        jobs.append(
            subprocess.Popen(
                [sys.executable, "-m", "llm", "embed-multi", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=process_env(),
            )
        )
    outputs = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    # 30 batches (a process that could not use the state file says so in its output)
    assert Counter(server.seen("key")) == {"sk-work": 15, "sk-personal": 15}, outputs
    embedded = Counter(text for _, text in server.embedded)
    assert len(embedded) == 300 and set(embedded.values()) == {1}
    for name in ("one", "two"):
        assert len(stored(tmp_path / f"{name}.db")) == 150


def test_a_429_mid_job_fails_over_and_every_item_is_embedded_once(user_path, server, tmp_path):
    server.no_sdk_retries = False  # as OpenAI answers: the SDK would retry the 429 itself
    save_lb("docs", *DOCS, flags=("--embedding",))
    local = server
    local.fail("429", key="sk-work", times=1, after=2)  # work's third batch
    rows = items_file(tmp_path / "items.json", 100)
    ok("embed-multi", "docs", str(tmp_path / "items.json"), "-m", "lb:docs", "--batch-size", "10")
    work, personal = "sk-work", "sk-personal"
    # work answers twice, its third batch (the fifth) goes to personal; then work cools down
    # (30 s, the default) and personal embeds the rest. No retry of the 429 by the SDK.
    assert local.seen("key") == [work, personal, work, personal, work] + [personal] * 6
    assert Counter(text for _, text in local.embedded) == {row["content"]: 1 for row in rows}
    assert Counter(key for key, _ in local.embedded) == {work: 20, personal: 80}
    assert len(stored(user_path / "embeddings.db")) == 100
    members = member_stats("docs")
    assert [(m["requests"], m["successes"], m["failures"]) for m in members] == [
        (3, 2, 1),
        (8, 8, 0),
    ]
    assert members[0]["last_error"].startswith("429 rate limited")
    assert members[0]["cooling_down_for"] == "429 rate limited"


def test_every_member_failing_is_one_line(user_path, server):
    save_lb("docs", *DOCS, flags=("--embedding",))
    server.fail("429", key="sk-work")
    server.fail("500", key="sk-personal")
    assert refused("embed", "-m", "lb:docs", "-c", "hello") == (
        "Error: lb:docs: all 2 members failed: 3-small (key: work): 429 rate limited; "
        "text-embedding-3-small (key: personal): 500 server error"
    )
    with pytest.raises(LoadBalancerError) as caught:  # a ValueError, from the Python API
        llm.get_embedding_model("lb:docs").embed("hello")
    assert str(caught.value).startswith("lb:docs: all 2 members failed")


def test_a_collection_made_with_it_works_with_llm_similar(user_path, server, tmp_path):
    save_lb("docs", *DOCS, flags=("--embedding",))
    rows = [
        {"id": "cats", "content": "cats purr softly"},
        {"id": "dogs", "content": "dogs bark loudly"},
        {"id": "fish", "content": "fish swim quietly"},
    ]
    (tmp_path / "pets.json").write_text(json.dumps(rows))
    ok("embed-multi", "docs", str(tmp_path / "pets.json"), "-m", "lb:docs", "--store")
    found = [json.loads(line) for line in ok("similar", "docs", "-c", "purr cats").splitlines()]
    assert (found[0]["id"], found[0]["content"]) == ("cats", "cats purr softly")
    assert [row["score"] for row in found] == sorted(
        (llm.cosine_similarity(vector("purr cats"), vector(row["content"])) for row in rows),
        reverse=True,
    )
    # the query was embedded by the balancer too: the next key in turn
    assert server.seen("key") == ["sk-work", "sk-personal"]
    # by id: the stored vectors, no new request
    closest = json.loads(ok("similar", "docs", "dogs", "-n", "1"))
    assert closest["id"] in ("cats", "fish") and len(server.requests) == 2


def test_python_api_capabilities_weights_and_the_key_given_at_embed_time(user_path, server):
    save_lb("docs", "3-small key=work weight=2", "3-small", flags=("--embedding",))
    model = llm.get_embedding_model("lb:docs")
    assert (model.batch_size, model.supports_text, model.supports_binary) == (100, True, False)
    assert model.embed("hello world") == vector("hello world")
    texts = [f"text {n}" for n in range(5)]
    assert list(model.embed_multi(texts, batch_size=1)) == [vector(t) for t in texts]
    # the key given at embed time reaches the member without a key of its own
    for _ in range(2):
        assert list(model.embed_multi(["a", "b"], key="personal")) == [vector("a"), vector("b")]
    # weights 2 and 1: work, default, work, again and again; default is the model's own key
    assert server.seen("key") == [
        "sk-work",
        "sk-default",
        "sk-work",
        "sk-work",
        "sk-default",
        "sk-work",
        "sk-work",
        "sk-personal",
    ]


def test_a_member_without_a_key_fails_over(user_path, server):
    (user_path / "keys.json").write_text(json.dumps({"work": "sk-work"}))  # no openai key
    save_lb("docs", "3-small", "3-small key=work", flags=("--embedding",))
    assert json.loads(ok("embed", "-m", "lb:docs", "-c", "hello")) == vector("hello")
    assert server.seen("key") == ["sk-work"]
    assert member_stats("docs")[0]["last_error"].startswith("missing key")


def test_limits_count_one_request_per_batch(user_path, server):
    limited = ("3-small key=work rpm=2", "3-small key=personal rpm=2")
    save_lb("docs", *limited, flags=("--embedding", "--max-wait", "0"))
    model = llm.get_embedding_model("lb:docs")
    with pytest.raises(LoadBalancerError, match="every member is at its limit"):
        list(model.embed_multi([f"text {n}" for n in range(10)], batch_size=2))
    assert len(server.requests) == 4 and len(server.embedded) == 8  # 4 batches of 2


def test_a_member_that_does_not_answer_in_time_is_abandoned(user_path, server):
    save_lb("docs", *DOCS, flags=("--embedding", "--timeout", "1"))
    server.fail("hang", key="sk-work", times=1)
    try:
        assert llm.get_embedding_model("lb:docs").embed("hi") == vector("hi")
        assert server.seen("key") == ["sk-work", "sk-personal"]
        assert member_stats("docs")[0]["last_error"].startswith("timed out: no answer within")
    finally:
        server.release()


def test_an_alias_that_now_names_another_model_is_refused_when_used(user_path, server):
    (user_path / "aliases.json").write_text(json.dumps({"mine": "text-embedding-3-small"}))
    save_lb("docs", "3-small key=work", "mine key=personal", flags=("--embedding",))
    (user_path / "aliases.json").write_text(json.dumps({"mine": "text-embedding-3-large"}))
    docs = user_path / "loadbalancers" / "docs.yaml"
    assert refused("embed", "-m", "lb:docs", "-c", "hello") == (
        f"Error: lb:docs: {docs}: member 2 (mine, key: personal): it embeds with "
        "text-embedding-3-large and member 1 with text-embedding-3-small: every member of an "
        "embedding balancer must be the same model (at the same dimensions), or the vectors in "
        "one collection could not be compared; balance several keys of one model instead"
    )
    assert server.requests == []


def test_a_broken_file_never_breaks_llm(user_path, server):
    folder = user_path / "loadbalancers"
    folder.mkdir()
    (folder / "bad.yaml").write_text("kind: embedding\nmembers: [3-small, 3-small]\nsticky: 1\n")
    (folder / "worse.yaml").write_text("members: [\n")
    listed = ok("embed-models")
    assert f"LoadBalancerEmbedding: lb:bad (broken: {folder / 'bad.yaml'}: sticky must be" in listed
    assert "LoadBalancerEmbedding: lb:worse (broken:" in listed  # its kind cannot be told
    assert "lb:bad" not in ok("models") and "lb:worse" in ok("models")
    assert refused("embed", "-m", "lb:bad", "-c", "hi").startswith(
        f"Error: lb:bad: {folder / 'bad.yaml'}: sticky must be true or false"
    )
    assert json.loads(ok("embed", "-m", "3-small", "-c", "hi")) == vector("hi")


# --- a member plugin of the older kind, and one that miscounts --------------------------------


class KeyOnTheModel(llm.EmbeddingModel):
    "An embedding model whose embed_batch predates llm's key= argument: it reads self.key."

    model_id = "key-on-the-model"
    needs_key = "old"
    seen: ClassVar[list] = []

    def embed_batch(self, items):
        self.seen.append(self.key)
        return [[float(len(item))] for item in items]


class Miscounts(llm.EmbeddingModel):
    model_id = "miscounts"

    def embed_batch(self, items, *, key=None):
        return [[1.0] for _ in list(items)[1:]]


class Plugin:
    __name__ = "lb-test-embedding-models"

    @llm.hookimpl
    def register_embedding_models(self, register):
        register(KeyOnTheModel())
        register(Miscounts())


@pytest.fixture
def older_plugins():
    pm.register(Plugin(), name=Plugin.__name__)
    KeyOnTheModel.seen.clear()
    yield
    pm.unregister(name=Plugin.__name__)


def test_a_member_that_reads_its_key_from_the_model_gets_its_own(user_path, older_plugins):
    set_keys(user_path, a="key-a", b="key-b")
    save_lb("old", "key-on-the-model key=a", "key-on-the-model key=b", flags=("--embedding",))
    model = llm.get_embedding_model("lb:old")
    assert list(model.embed_multi(["x", "yy", "zzz"], batch_size=1)) == [[1.0], [2.0], [3.0]]
    assert KeyOnTheModel.seen == ["key-a", "key-b", "key-a"]
    assert [member.key for member in model.member_models()] == [None, None]  # copies had them


def test_a_member_that_returns_too_few_vectors_is_an_error(user_path, older_plugins):
    save_lb("short", "miscounts", "miscounts", flags=("--embedding",))
    with pytest.raises(ValueError) as caught:  # not failed over: the other is the same model
        next(llm.get_embedding_model("lb:short").embed_multi(["a", "b"]))
    assert str(caught.value) == (
        "lb:short: member 1 (miscounts): it returned 1 vector for a batch of 2 items"
    )
    assert [m["failures"] for m in member_stats("short")] == [1, 0]
