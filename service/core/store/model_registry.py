"""The models live workers serve (models, served:{model}), those they refuse, and their published tokenizers."""

from __future__ import annotations

import logging

import msgspec

from hydra_ablate_client.wire import ModelInfo
from service.core.redis_replies import as_bytes
from service.core.store.base import StoreBase
from service.core.store.job_records import text

logger = logging.getLogger("service.core.store")


class ModelRegistry(StoreBase):
    def advertise_model(self, info: ModelInfo, ttl_s: int | None = None) -> None:
        """A worker announces a model it serves; the API validates requests against these records.

        With `ttl_s` the model counts as served only while some worker keeps calling `keep_serving`: when the
        last worker serving it stops, the API stops accepting jobs for it instead of queueing them forever.
        """
        self.client.hset(self.keys.models, info.id, msgspec.json.encode(info))
        self.client.hdel(self.keys.refused_models, info.id)
        self.client.set(self.keys.served(info.id), b"1", ex=ttl_s)

    def keep_serving(self, model_ids: list[str], ttl_s: int) -> None:
        """A worker's heartbeat for the models it serves."""
        with self.client.pipeline() as pipe:
            for model_id in model_ids:
                pipe.set(self.keys.served(model_id), b"1", ex=ttl_s)
            pipe.execute()

    def refuse_model(self, model_id: str, reason: str) -> None:
        """A worker was configured with a model the engine cannot decompose; jobs for it get this reason."""
        self.client.hset(self.keys.refused_models, model_id, reason)
        self.client.hdel(self.keys.models, model_id)

    def refused_models(self) -> dict[str, str]:
        return {text(k) or "": text(v) or "" for k, v in self.client.hgetall(self.keys.refused_models).items()}

    def models(self) -> list[ModelInfo]:
        """The models some live worker serves (see `advertise_model`)."""
        found: list[ModelInfo] = []
        records = sorted(self.client.hgetall(self.keys.models).items())
        alive = self.client.mget([self.keys.served(text(model_id) or "") for model_id, _ in records]) if records else []
        for (model_id, raw), served in zip(records, alive, strict=True):
            if served is None:
                continue
            try:
                found.append(msgspec.json.decode(raw, type=ModelInfo))
            except msgspec.DecodeError:
                logger.warning("ignoring a malformed model record %r", text(model_id))
        return found

    def publish_tokenizer(self, model_id: str, tokenizer_json: str) -> None:
        """A worker shares its model's tokenizer so the API can count prompt tokens without loading the model."""
        self.client.set(self.keys.tokenizer(model_id), tokenizer_json)

    def tokenizer_json(self, model_id: str) -> str | None:
        """The Hugging Face tokenizers JSON a worker published for `model_id`; None until one has."""
        raw = self.client.get(self.keys.tokenizer(model_id))
        return None if raw is None else as_bytes(raw).decode()
