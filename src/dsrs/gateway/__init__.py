"""The dsrs gateway: an OpenAI-compatible server (Chat Completions, Responses, models) and Anthropic
Messages over dsrs lanes.

`dsrs serve --config dsrs.toml` runs it; `config` holds the TOML schema, `requests` the OpenAI
requests in (parsing, validation, errors to the client), `replies` the OpenAI bodies and SSE streams
out, `anthropic_wire` the Anthropic Messages wire (in and out), `runtime` what a config builds, `app`
the HTTP handlers, `bad_http` the fixed answer to malformed HTTP, `metrics` the Prometheus counters.
Shared state across gateway processes is `dsrs.redis_state`.
"""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None) -> int:
    from .__main__ import main as run

    return run(argv)


def __getattr__(name: str) -> Any:
    if name in ("make_app", "serve", "start"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
