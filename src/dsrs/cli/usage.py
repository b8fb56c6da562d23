"""`dsrs usage`: the usage ledger grouped by model, lane, day, provider or program."""

from __future__ import annotations

import argparse

from .show import _msats, _out, _table


async def usage(args: argparse.Namespace) -> int:
    import time

    from ..errors import ConfigurationError
    from ..ledger import default_ledger

    led = default_ledger()
    since = time.time() - args.days * 86400 if args.days else None
    summary = led.summary(args.by, since)
    if not summary:
        _out(f"no calls recorded yet in {getattr(led, 'path', None) or 'the Redis ledger (DSRS_REDIS_URL)'}")
        return 0
    rows = []
    for s in summary:
        cost = _msats(s.cost_msats, "") + (f" (+{s.unknown_cost_calls} unknown)" if s.unknown_cost_calls else "")
        rows.append((s.key, str(s.calls), str(s.prompt_tokens), str(s.completion_tokens), str(s.total_tokens), cost,
                     str(s.cache_hits)))  # fmt: skip
    _out(_table((args.by, "calls", "prompt", "completion", "tokens", "cost msats (USD)", "cache hits"), rows))
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigurationError(
                "--plot is not available: it needs matplotlib, which dsrs does not install", hint="pip install matplotlib"
            ) from None
        days = led.summary("day", since)
        fig, (a, b) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
        a.bar([d.key for d in days], [d.cost_msats for d in days])
        a.set_ylabel("cost (msats)")
        b.bar([d.key for d in days], [d.total_tokens for d in days])
        b.set_ylabel("tokens")
        fig.autofmt_xdate()
        fig.savefig(args.plot)
        _out(f"wrote {args.plot}")
    return 0
