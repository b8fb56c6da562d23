"""Embeddings from the embedded engine: llama.cpp (xllamacpp) in this process, `handle_embeddings`.

llama.cpp embeds only on an engine started for it (`embedding = true` and a pooling type: the
completion engine answers 501), so embeddings get their own engine per model, loaded on first use:
mean pooling, L2-normalized vectors (llama.cpp's default), and a physical batch as large as the
context (`n_ctx` tokens), since llama.cpp embeds each input in one batch. The answer is OpenAI-shaped
(`data[]`, `usage.prompt_tokens`, BOS included). Free.

The bundled Gemma 3 270M is a generative base model, not a trained embedding model: its mean-pooled
hidden states (640 dimensions) rank related sentences closer than unrelated ones, which is enough
for offline tests and demos, not for retrieval quality. `embedded/<path to a .gguf>` loads any GGUF,
e.g. an embedding model (EmbeddingGemma, nomic-embed-text, bge...).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .. import errors
from . import embedded
from .embedding import EmbedRequest, Result, refuse
from .openai_embeddings import decode
from .services import Service

MAX_BATCH = 256  # inputs per engine call (each is one llama.cpp task)
N_CTX = 2048  # the longest input, in tokens
_engines: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def engine(model: str, n_ctx: int = N_CTX) -> Any:
    """The process-wide embedding engine for a model (mean pooling), loaded on first use."""
    path = embedded.model_path(model)
    key = (path, n_ctx)
    with _lock:
        s = _engines.get(key)
        if s is None:
            import xllamacpp

            p = embedded.params(path, n_ctx)
            p.embedding = True
            p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
            p.n_batch = p.n_ubatch = n_ctx  # one input must fit in one physical batch
            s = _engines[key] = xllamacpp.Server(p)
        return s


class Client:
    MAX_BATCH = MAX_BATCH

    def __init__(self, service: Service, model: str, opts: dict[str, Any]) -> None:
        self.model = model
        self.opts = opts

    async def embed(self, req: EmbedRequest) -> Result:
        if req.dimensions is not None or req.task_type is not None or req.encoding_format != "float":
            refuse("embedded", self.model, "dimensions, task_type or encoding_format",
                   "the embedded engine returns its model's full vectors as floats: drop those options")  # fmt: skip
        body = {"input": list(req.texts), **req.extra}
        r = await asyncio.to_thread(lambda: engine(self.model).handle_embeddings(body))
        if isinstance(r, dict) and isinstance(r.get("error"), dict):
            code = r["error"].get("code")
            err = errors.from_response(code if isinstance(code, int) else 500, r, provider="embedded", model=self.model)
            err.billed = False  # type: ignore[attr-defined]  # local: nothing is billed
            err.should_retry = False  # type: ignore[attr-defined]  # in process and deterministic: a retry fails alike
            if err.hint is None:
                err.hint = f"inputs may be at most {N_CTX} tokens each for the embedded engine: split longer texts"
                err.args = (str(err),)
            raise err
        if isinstance(r, dict):
            r = {k: v for k, v in r.items() if k != "model"}  # the engine names the .gguf path
        return decode(r, req, "embedded", self.model)
