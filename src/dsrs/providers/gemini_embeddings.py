"""Gemini embeddings: `POST models/{model}:batchEmbedContents`, key in `x-goog-api-key`.

Request: `requests[]`, one per input, each `{model: "models/{model}", content: {parts: [{text}]}}` with
`taskType` and `outputDimensionality` when set. Answer: `embeddings[]` of `{values}` in input order,
and `usageMetadata.promptTokenCount` (sent by current servers; without it the usage, hence the cost,
is unknown, and a budget keeps the worst case). At most 100 requests per batch.
"""

from __future__ import annotations

from typing import Any

from .. import errors, http
from .base import HttpBackend
from .embedding import EmbedRequest, Result, bad, refuse, usage, vectors

MAX_BATCH = 100


def encode(req: EmbedRequest) -> dict[str, Any]:
    name = req.model if req.model.startswith("models/") else f"models/{req.model}"
    one: dict[str, Any] = {"model": name}
    if req.task_type is not None:
        one["taskType"] = req.task_type
    if req.dimensions is not None:
        one["outputDimensionality"] = req.dimensions
    body: dict[str, Any] = {"requests": [{**one, "content": {"parts": [{"text": t}]}} for t in req.texts]}
    body.update(req.extra)
    return body


def decode(payload: Any, req: EmbedRequest, provider: str, model: str) -> Result:
    if not isinstance(payload, dict) or not isinstance(payload.get("embeddings"), list):
        if isinstance(payload, dict) and "error" in payload:
            raise errors.from_response(502, payload, provider=provider, model=model)
        raise bad(payload, "a batchEmbedContents answer", provider, model)
    try:
        items = [e["values"] for e in payload["embeddings"]]
    except (TypeError, KeyError):
        raise bad(str(payload["embeddings"])[:120], "embeddings with values", provider, model) from None
    u = payload.get("usageMetadata") or {}
    if not isinstance(u, dict):
        raise bad(u, "usageMetadata", provider, model)
    return vectors(items, req, provider, model), usage(u.get("promptTokenCount"), u.get("totalTokenCount"), provider,
                                                        model), model  # fmt: skip


class Client(HttpBackend):
    MAX_BATCH = MAX_BATCH

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        path = self.model if self.model.startswith("models/") else f"models/{self.model}"
        self._ep = self.endpoint(f"/{path}:batchEmbedContents")

    async def embed(self, req: EmbedRequest) -> Result:
        if req.encoding_format != "float":
            refuse(self.service.name, self.model, f"encoding_format {req.encoding_format!r}",
                   "Gemini answers with floats: drop with_encoding_format(...)")  # fmt: skip
        payload = await http.post_json(self._ep, encode(req))
        return decode(payload, req, self.service.name, self.model)
