"""OpenAI embeddings (`POST /embeddings`), spoken by OpenAI and the OpenAI-compatible services
(llama.cpp's server, vLLM, Mistral, Together, Azure deployments...).

Request: `model`, `input` (a list of strings), `encoding_format` ("float", or "base64": little-endian
float32, decoded here), `dimensions` when set (text-embedding-3 and later). Answer: `data[]` of
`{index, embedding}` (put back in input order by `index`) and `usage {prompt_tokens, total_tokens}`.
At most 2,048 inputs and 300,000 tokens per request (bounded here by bytes, a token being at least
one byte): `Embedder` splits larger inputs.
"""

from __future__ import annotations

import os
from typing import Any

from .. import errors, http
from .base import HttpBackend
from .embedding import EmbedRequest, Result, bad, refuse, usage, vectors

MAX_BATCH = 2048
MAX_BATCH_BYTES = 300_000  # OpenAI's 300k tokens per request, as bytes (an upper bound of tokens)


def encode(req: EmbedRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": req.model, "input": list(req.texts), "encoding_format": req.encoding_format}
    if req.dimensions is not None:
        body["dimensions"] = req.dimensions
    body.update(req.extra)
    return body


def decode(payload: Any, req: EmbedRequest, provider: str, model: str) -> Result:
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        if isinstance(payload, dict) and "error" in payload:  # some servers send errors with 200
            raise errors.from_response(502, payload, provider=provider, model=model)
        raise bad(payload, "an embeddings answer", provider, model)
    data = payload["data"]
    try:
        ordered = sorted(data, key=lambda d: d["index"]) if all("index" in d for d in data) else data
        items = [d["embedding"] for d in ordered]
        indexes = [d.get("index", i) for i, d in enumerate(ordered)]
    except (TypeError, KeyError, AttributeError):
        raise bad(str(data)[:120], "embedding objects with index and embedding", provider, model) from None
    if indexes != list(range(len(items))):
        raise bad(indexes[:20], "one embedding per input index", provider, model)
    u = payload.get("usage") or {}
    if not isinstance(u, dict):
        raise bad(u, "a usage object", provider, model)
    m = payload.get("model")
    return vectors(items, req, provider, model), usage(u.get("prompt_tokens"), u.get("total_tokens"), provider, model), \
        m if isinstance(m, str) and m else model  # fmt: skip


class Client(HttpBackend):
    MAX_BATCH = MAX_BATCH
    MAX_BATCH_BYTES = MAX_BATCH_BYTES

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        path = "/embeddings"
        if "azure" in self.service.quirks:
            version = self.opts.get("api_version") or os.environ.get("OPENAI_API_VERSION") or "2024-10-21"
            path = f"/openai/deployments/{self.model}/embeddings?api-version={version}"
        self._ep = self.endpoint(path)

    async def embed(self, req: EmbedRequest) -> Result:
        if req.task_type is not None:
            refuse(self.service.name, self.model, "a task type", "task_type is Gemini's; drop it here")
        payload = await http.post_json(self._ep, encode(req))
        return decode(payload, req, self.service.name, self.model)
