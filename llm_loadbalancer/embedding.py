"""The ``lb:NAME`` embedding models that llm registers: capabilities, listing, ``embed_batch``.

Registration builds these for every embedding model lookup, so this module imports nothing but
llm and the config's names. The members are looked up when the balancer is first used (a
lookup while llm registers embedding models would run the hook again), and what happens to a
batch is ``batch.py``'s, imported on the first batch.
"""

from __future__ import annotations

import llm

from .config import EMBEDDING, PREFIX


class EmbeddingBalancer(llm.EmbeddingModel):
    needs_key = None
    is_async = False

    def __init__(self, name: str, balancer, problem: str | None, path: str | None = None):
        self.model_id = PREFIX + name
        self.balancer = balancer  # None when its file is broken
        self.path = path
        self._problem = problem  # why it cannot embed, or None
        self._models: list | None = None  # each member's embedding model, once looked up
        # every member is the one model: a member that is not installed is a problem, never
        # skipped (``delegate.Run`` reads this)
        self.missing: dict = {}

    def member_models(self) -> list:
        "Each member's embedding model, looked up and checked on first use; [] with a problem."
        if self._models is None and self._problem is None:
            from .config import ConfigError
            from .members import Catalog, check_saved, load_stored_keys

            try:
                keys = load_stored_keys() if any(m.key for m in self.balancer.members) else {}
                catalog = Catalog(llm.get_embedding_models_with_aliases(), kind=EMBEDDING)
                found, _ = check_saved(self.balancer, catalog, keys)
            except ConfigError as ex:
                self._problem = f"{self.path}: {ex}"
            except Exception as ex:  # noqa: BLE001 (whatever a member's plugin raises)
                self._problem = f"{self.path}: {type(ex).__name__}: {ex}"
            else:
                self._models = [mwa.model for mwa in found]
        return self._models or []

    @property
    def problem(self) -> str | None:
        self.member_models()
        return self._problem

    # What every member can do. A broken balancer claims both kinds of input, so that what
    # llm reports is its problem, from ``embed_batch``.
    @property
    def batch_size(self) -> int | None:
        "The smallest of the members' batch sizes; None (llm's default) when none has one."
        sizes = [model.batch_size for model in self.member_models() if model.batch_size]
        return min(sizes) if sizes else None

    @property
    def supports_text(self) -> bool:
        return all(model.supports_text for model in self.member_models())

    @property
    def supports_binary(self) -> bool:
        return all(model.supports_binary for model in self.member_models())

    def get_key(self, explicit_key=None):
        # --key is passed through unchanged; each member resolves it (or uses its own key).
        return explicit_key

    def embed_batch(self, items, *, key=None):
        from .batch import embed

        return embed(self, items, key)

    def __str__(self) -> str:
        if self.balancer is None:
            return f"LoadBalancerEmbedding: {self.model_id} (broken: {self._problem})"
        labels = ", ".join(member.label() for member in self.balancer.members)
        return f"LoadBalancerEmbedding: {self.model_id} ({self.balancer.policy}: {labels})"
