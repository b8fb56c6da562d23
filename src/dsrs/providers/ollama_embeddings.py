"""Ollama embeddings: `POST /api/embed` (the current endpoint; `/api/embeddings` is deprecated).

Request: `model`, `input` (a list of strings), `dimensions` when set; `truncate`, `keep_alive` and
`options` pass through `extra`. Answer: `embeddings` (a list of vectors, in input order), `model`
and `prompt_eval_count` (the input tokens). Local: free.
"""

from __future__ import annotations

from typing import Any

from .. import errors, http
from .base import HttpBackend
from .embedding import EmbedRequest, Result, bad, refuse, usage, vectors

MAX_BATCH = 2048  # Ollama documents no limit; batches of this size keep one request's body bounded


def encode(req: EmbedRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "input": list(req.texts)}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    body.update(req.extra)
    return body


def decode(payload: Any, req: EmbedRequest, provider: str, model: str) -> Result:
    if not isinstance(payload, dict) or "embeddings" not in payload:
        if isinstance(payload, dict) and "error" in payload:
            raise errors.from_response(502, payload, provider=provider, model=model)
        raise bad(payload, "an /api/embed answer", provider, model)
    m = payload.get("model")
    return vectors(payload["embeddings"], req, provider, model), \
        usage(payload.get("prompt_eval_count"), None, provider, model), m if isinstance(m, str) and m else model  # fmt: skip


class Client(HttpBackend):
    MAX_BATCH = MAX_BATCH

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._ep = self.endpoint("/api/embed")

    async def embed(self, req: EmbedRequest) -> Result:
        if req.encoding_format != "float" or req.task_type is not None:
            refuse(self.service.name, self.model, "encoding_format or task_type",
                   "Ollama answers with floats and has no task types: drop them")  # fmt: skip
        payload = await http.post_json(self._ep, encode(req))
        return decode(payload, req, self.service.name, self.model)
