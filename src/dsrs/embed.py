"""Embeddings: `Embedder("provider/model")` over the same machinery as `LM`.

```python
e = dsrs.Embedder("openai/text-embedding-3-small").with_dimensions(256).with_cache(True)
r = e.embed(["first text", "second text"])      # or: await e.aembed(...); one string works too
r.vectors, r.usage.prompt_tokens, r.usage.cost_msats
```

One call path, as `BaseLM`'s: the cache (a hit costs 0), then per provider request (inputs are split
into batches of the provider's limit: OpenAI 2,048 inputs and 300k tokens, Gemini 100): reserve the
worst case on every budget that applies (one token per UTF-8 byte plus `MESSAGE_OVERHEAD` per input,
at the input price), send, settle to the priced usage, or book what a failure may have cost (only an
error proving nothing was billed releases; `dsrs.budget`); retries as the provider's SDK does; typed
errors with secrets scrubbed. Usage adds up across batches. Every call (a cache hit included) is a row
in the usage ledger (`program="embed"`) unless `with_ledger(False)` or `DSRS_LEDGER=off`.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from . import _sync, pricing
from .budget import NO_HOLD, applicable, reserve
from .cache import KEY_VERSION, Cache, default_cache
from .errors import ConfigurationError, DsrsError, ResponseFormatError
from .lm import _CHECKS, _SECRET_HEADER, _scrub_error
from .providers.base import Secret
from .providers.embedding import EmbedBackend, EmbedRequest, module
from .retry import RetryPolicy
from .types import CostSource, LmUsage
from .worst_case import MESSAGE_OVERHEAD

# Options that change the vectors (in the cache key) vs. options of the connection and the books.
_REQUEST_FIELDS = ("dimensions", "encoding_format", "task_type", "extra")
_CLIENT_FIELDS = ("base_url", "api_key", "timeout", "retries", "retry_policy", "cache", "budget", "headers",
                  "api_version", "batch_size", "ledger")  # fmt: skip
_ALIASES = {"api_base": "base_url", "num_retries": "retries", "max_retries": "retries", "request_timeout": "timeout",
            "output_dimensionality": "dimensions", "outputDimensionality": "dimensions", "taskType": "task_type"}  # fmt: skip
_OWN_CHECKS: dict[str, tuple[Any, str, str]] = {
    "dimensions": (lambda v: type(v) is int and v > 0, "a positive whole number", "256"),
    "batch_size": (lambda v: type(v) is int and v > 0, "a positive whole number of inputs", "100"),
    "encoding_format": (lambda v: v in ("float", "base64"), '"float" or "base64"', '"base64"'),
    "task_type": (lambda v: isinstance(v, str) and v, "a Gemini task type", '"RETRIEVAL_DOCUMENT"'),
    "extra": (lambda v: isinstance(v, dict), "a dict of provider parameters", '{"user": "u1"}'),
}
_DEFAULT_RETRY = RetryPolicy()


@dataclass(slots=True)
class Embeddings:
    """The vectors of one `embed` call, in input order, with what they cost."""

    vectors: list[list[float]]
    model: str
    provider: str
    usage: LmUsage = field(default_factory=LmUsage)
    latency_s: float | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def __iter__(self) -> Iterator[list[float]]:
        return iter(self.vectors)

    def __getitem__(self, i: int) -> list[float]:
        return self.vectors[i]

    def __repr__(self) -> str:
        dims = len(self.vectors[0]) if self.vectors else 0
        return (f"Embeddings({len(self.vectors)} x {dims}, {self.provider}/{self.model}, "
                f"{self.usage.prompt_tokens} tokens, cost_msats={self.usage.cost_msats})")  # fmt: skip


def texts_of(texts: str | Iterable[str]) -> tuple[str, ...]:
    """The inputs as a tuple of non-empty strings, or a ConfigurationError saying what to pass."""
    if isinstance(texts, str):
        texts = (texts,)
    elif not isinstance(texts, Iterable) or isinstance(texts, (bytes, bytearray, Mapping)):
        raise ConfigurationError(f"embed() takes a string or a list of strings, not {type(texts).__name__}",
                                 hint='e.g. embed("a text") or embed(["one", "two"])')  # fmt: skip
    out = tuple(texts)
    if not out:
        raise ConfigurationError("nothing to embed: the list of texts is empty", hint="pass at least one string")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ConfigurationError(f"input {i} is a {type(t).__name__}, not a string",
                                     hint="embed strings only; convert other values with str(...) first")  # fmt: skip
        if not t:
            raise ConfigurationError(f"input {i} is an empty string, which providers refuse",
                                     hint="drop empty texts before embedding, or put a placeholder")  # fmt: skip
    return out


class Embedder:
    """`Embedder("provider/model", **options)`: any provider with an embeddings API behind one interface.

    Instances are immutable: every `with_*` returns a copy."""

    def __init__(self, model: str, **opts: Any) -> None:
        from .registry import resolve

        self.service, self.model = resolve(model)
        self.provider = self.service.name
        self._opts: dict[str, Any] = {}
        self._backend_obj: EmbedBackend | None = None
        self._set(opts)

    # -- builders ---------------------------------------------------------------------------
    def _set(self, opts: dict[str, Any]) -> None:
        known = _REQUEST_FIELDS + _CLIENT_FIELDS
        for k, v in opts.items():
            k = _ALIASES.get(k, k)
            if k not in known:
                close = difflib.get_close_matches(k, known + tuple(_ALIASES), n=1)
                guess = f": did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
                raise ConfigurationError(f"unknown option {k!r} for Embedder{guess}", hint="known: " + ", ".join(known))
            if k == "api_key" and v is not None and not isinstance(v, Secret):
                v = Secret(v)
            check = _OWN_CHECKS.get(k) or _CHECKS.get(k)
            if check is not None and v is not None and not check[0](v):
                raise ConfigurationError(f"{k} must be {check[1]}, got {v!r:.40}", hint=f"e.g. with_{k}({check[2]})")
            self._opts[k] = v

    def _with(self, **opts: Any) -> Self:
        new = copy.copy(self)
        new._opts = dict(self._opts)
        new._backend_obj = None
        new._set(opts)
        return new

    def with_dimensions(self, n: int) -> Self:
        """Shorter vectors (OpenAI text-embedding-3 `dimensions`, Gemini `outputDimensionality`, Ollama)."""
        return self._with(dimensions=n)

    def with_encoding_format(self, fmt: str) -> Self:
        """What to ask an OpenAI-compatible server for: "float" (default) or "base64" (float32, decoded)."""
        return self._with(encoding_format=fmt)

    def with_task_type(self, task_type: str) -> Self:
        """Gemini's taskType: RETRIEVAL_QUERY, RETRIEVAL_DOCUMENT, SEMANTIC_SIMILARITY, CLASSIFICATION..."""
        return self._with(task_type=task_type)

    def with_extra(self, **params: Any) -> Self:
        """Provider parameters sent as they are (OpenAI `user`, Ollama `truncate`/`keep_alive`...)."""
        return self._with(extra={**(self._opts.get("extra") or {}), **params})

    def with_batch_size(self, n: int) -> Self:
        """Inputs per provider request (default: the provider's limit)."""
        return self._with(batch_size=n)

    def with_base_url(self, url: str) -> Self:
        return self._with(base_url=url)

    def with_api_key(self, key: str) -> Self:
        return self._with(api_key=key)

    def with_timeout(self, seconds: float | Any) -> Self:
        if hasattr(seconds, "total_seconds"):
            seconds = seconds.total_seconds()
        return self._with(timeout=float(seconds))

    def with_retries(self, n: int) -> Self:
        return self._with(retries=n)

    def with_cache(self, enabled: bool | Cache = True) -> Self:
        return self._with(cache=enabled)

    def with_budget(self, budget: Any) -> Self:
        """Reserve every request's worst case on this `dsrs.Budget` (see dsrs.budget)."""
        return self._with(budget=budget)

    def with_ledger(self, enabled: bool = True) -> Self:
        """Record each call in the usage ledger (default on; `DSRS_LEDGER=off` turns every ledger off)."""
        return self._with(ledger=enabled)

    def with_options(self, **opts: Any) -> Self:
        return self._with(**opts)

    @property
    def options(self) -> dict[str, Any]:
        """The options set; the API key stays a hidden `Secret`, secret-looking headers show as stars."""
        o = dict(self._opts)
        if o.get("headers"):
            o["headers"] = {k: "**********" if _SECRET_HEADER.search(k) else v for k, v in o["headers"].items()}
        return o

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._opts.items() if k not in ("api_key", "headers", "retry_policy")}
        if "api_key" in self._opts:
            shown["api_key"] = "**********"
        return f"Embedder({self.provider}/{self.model!r}{''.join(f', {k}={v!r}' for k, v in shown.items())})"

    # -- the pieces of a call -----------------------------------------------------------------
    @property
    def backend(self) -> EmbedBackend:
        if self._backend_obj is None:
            self._backend_obj = module(self.service).Client(self.service, self.model, self._opts)
        return self._backend_obj

    def request(self, texts: str | Iterable[str]) -> EmbedRequest:
        """The normalized request this Embedder would send for `texts` (before batching)."""
        o = self._opts
        return EmbedRequest(self.model, texts_of(texts), o.get("dimensions"), o.get("encoding_format") or "float",
                            o.get("task_type"), dict(o.get("extra") or {}))  # fmt: skip

    def batches(self, req: EmbedRequest) -> list[EmbedRequest]:
        """`req` split into provider requests: at most `batch_size` inputs (default the provider's limit)
        and, where the provider caps tokens per request, at most that many bytes (a token >= 1 byte)."""
        backend = self.backend
        size = self._opts.get("batch_size") or backend.MAX_BATCH
        cap = getattr(backend, "MAX_BATCH_BYTES", None)
        out: list[EmbedRequest] = []
        cur: list[str] = []
        used = 0
        for t in req.texts:
            n = len(t.encode("utf-8")) if cap else 0
            if cur and (len(cur) >= size or (cap and used + n > cap)):
                out.append(req.part(tuple(cur)))
                cur, used = [], 0
            cur.append(t)
            used += n
        out.append(req.part(tuple(cur)))
        return out

    def worst_case_msats(self, req: EmbedRequest) -> int | None:
        """The most one request can cost: one token per UTF-8 byte plus `MESSAGE_OVERHEAD` per input,
        at the input price (`dsrs.budget` reserves this); None when the price is unknown."""
        tokens = sum(len(t.encode("utf-8")) + MESSAGE_OVERHEAD for t in req.texts)
        return pricing.worst_case_msats(self.provider, self.model, tokens, 0)

    def cache_key(self, req: EmbedRequest) -> str:
        """SHA-256 of the provider, the request (model, texts, dimensions, encoding, task type, extra)
        and answer-changing connection options (API version, non-secret headers); never credentials."""
        o = self._opts
        headers = {k.lower(): v for k, v in (o.get("headers") or {}).items() if not _SECRET_HEADER.search(k)}
        doc = {"v": KEY_VERSION, "kind": "embeddings", "provider": self.provider, "request": req.canonical(),
               "scope": {"api_version": o.get("api_version"), "headers": headers}}  # fmt: skip
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                         default=str).encode()).hexdigest()  # fmt: skip

    def _cache(self) -> Cache | None:
        c = self._opts.get("cache")
        if not c:
            return None
        return c if isinstance(c, Cache) else default_cache()

    def _retry(self) -> RetryPolicy:
        p = self._opts.get("retry_policy") or _DEFAULT_RETRY
        n = self._opts.get("retries")
        return p if n is None else RetryPolicy(n, p.sleep, p.rand)

    def _secrets(self) -> tuple[str, ...]:
        found = [getattr(self._opts.get("api_key"), "get", lambda: None)(), getattr(self._backend_obj, "_key", None)]
        found += [v for k, v in (self._opts.get("headers") or {}).items() if _SECRET_HEADER.search(k)]
        return tuple(x for x in found if isinstance(x, str) and len(x) >= 4)

    def _failed(self, e: BaseException) -> BaseException:
        """As `BaseLM._failed`: anything that is not a DsrsError is a malformed answer (it may have been
        billed), and no error text carries a secret."""
        if not isinstance(e, Exception):
            return e
        if not isinstance(e, DsrsError):
            err: DsrsError = ResponseFormatError(
                f"could not read the answer ({type(e).__name__}: {str(e)[:200]})", provider=self.provider,
                model=self.model, hint="the answer did not have the shape its protocol promises; it may have been billed",
            )  # fmt: skip
            err.__cause__ = e
            e = err
        secrets = self._secrets()
        if secrets:
            _scrub_error(e, secrets)
        return e

    # -- calls ------------------------------------------------------------------------------
    async def aembed(self, texts: str | Iterable[str]) -> Embeddings:
        """Embed one string or a list of strings; the vectors come back in input order."""
        req = self.request(texts)
        started = time.perf_counter()
        cache = self._cache()
        key = self.cache_key(req) if cache is not None else None
        if cache is not None and key is not None:
            hit = _cached(cache, key)
            if hit is not None:
                hit.latency_s = time.perf_counter() - started
                self._record(hit)
                return hit
        budgets = applicable(self)
        vectors: list[list[float]] = []
        usage = LmUsage()
        model = self.model
        try:
            for part in self.batches(req):
                vs, u, model = await self._batch(part, budgets)
                vectors += vs
                usage = usage + u
        except DsrsError as e:
            if usage.calls:  # earlier batches were answered (and paid): their usage is on the books too
                e.usage = usage  # type: ignore[attr-defined]
                self._record(Embeddings([], model, self.provider, usage, time.perf_counter() - started))
            raise
        result = Embeddings(vectors, model, self.provider, usage, time.perf_counter() - started)
        if cache is not None and key is not None:
            _store(cache, key, result)
        self._record(result)
        return result

    def embed(self, texts: str | Iterable[str]) -> Embeddings:
        """Sync `aembed` (works inside a running event loop too)."""
        return _sync.run(self.aembed(texts))

    async def _batch(self, req: EmbedRequest, budgets: tuple[Any, ...]) -> tuple[list[list[float]], LmUsage, str]:
        try:  # the first try awaited here, the rest (if any) by the retry policy
            return await self._attempt(req, budgets)
        except DsrsError as e:
            try:
                return await self._retry().run(lambda: self._attempt(req, budgets), e)
            except DsrsError as e2:
                self._failed(e2)  # typed already: only scrubbed
                raise

    async def _attempt(self, req: EmbedRequest, budgets: tuple[Any, ...]) -> tuple[list[list[float]], LmUsage, str]:
        """One try of one request: reserve its worst case, send, settle to the priced usage or book
        what the failure may have cost (`Hold.fail`)."""
        # `reserve` hands `req` to `self.worst_case_msats` (the budget's bound for an embeddings request)
        hold = reserve(self, req, budgets) if budgets else NO_HOLD  # type: ignore[arg-type]
        try:
            vectors, usage, model = await self.backend.embed(req)
            usage = pricing.apply(usage, self.provider, self.model)
        except BaseException as e:
            err = self._failed(e)
            hold.fail(err)
            if err is e:
                raise
            raise err from e
        hold.settle(usage)
        return vectors, usage, model

    def _record(self, result: Embeddings) -> None:
        if self._opts.get("ledger", True):
            from . import ledger

            ledger.record(result, program="embed")


# -- the cache: JSON rows beside the answers, under keys of their own ----------------------------
_MEMORY_MAX = 1 << 20  # larger rows (a corpus in one call) stay on disk only: the memory LRU counts rows, not bytes
_HIT = {"cost_msats": 0, "cost_source": CostSource.CACHE, "cache_hit": True, "calls": 1}


def _store(cache: Cache, key: str, r: Embeddings) -> None:
    u = r.usage
    v = {"v": KEY_VERSION, "kind": "embeddings", "vectors": r.vectors, "model": r.model, "provider": r.provider,
         "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens}}  # fmt: skip
    text = json.dumps(v)  # text: a caller mutating `r.vectors` cannot reach it
    if len(text) <= _MEMORY_MAX:
        cache.memory.put(key, text)
    cache.store.put(key, v)


def _cached(cache: Cache, key: str) -> Embeddings | None:
    """A stored row as a free hit, or None when it is not an embeddings row of this key version."""
    blob = cache.memory.get(key)
    v: Any = json.loads(blob) if isinstance(blob, str) else cache.store.get(key)
    if not isinstance(v, dict) or v.get("v") != KEY_VERSION or v.get("kind") != "embeddings":
        return None
    vectors, u = v.get("vectors"), v.get("usage")
    try:  # numbers only (C speed), or another program's row: a miss
        ok = isinstance(vectors, list) and bool(vectors) and isinstance(u, dict) \
            and all(type(x) is list and x and sum(x, 0.0) is not None for x in vectors)  # fmt: skip
    except (TypeError, OverflowError):
        ok = False
    if not ok or not isinstance(u, dict):
        return None
    p, t = u.get("prompt_tokens"), u.get("total_tokens")
    if not (type(p) is int and type(t) is int and p >= 0 and t >= 0):
        return None
    if blob is None and len(text := json.dumps(v)) <= _MEMORY_MAX:
        cache.memory.put(key, text)
    usage = LmUsage(prompt_tokens=p, total_tokens=t, **_HIT)  # type: ignore[arg-type]
    return Embeddings(vectors, str(v.get("model") or ""), str(v.get("provider") or ""), usage)  # type: ignore[arg-type]
