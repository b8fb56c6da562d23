"""`dsrs serve --config dsrs.toml [--host 127.0.0.1 --port 8088]` (also `python -m dsrs.gateway`)."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="the gateway's TOML config (see dsrs.gateway.config)")
    p.add_argument("--host", help="address to listen on (default: [gateway] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: [gateway] port, else 8088)")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")


async def arun(args: argparse.Namespace) -> int:
    """`dsrs serve`: load the config, serve until SIGINT/SIGTERM. Config errors exit with status 2."""
    from ..errors import DsrsError
    from .app import serve
    from .config import load

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
        await serve(cfg, args.host, args.port)
    except DsrsError as e:
        print(f"dsrs serve: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsrs serve", description="An OpenAI-compatible gateway over dsrs lanes.")
    add_arguments(p)
    import asyncio

    return asyncio.run(arun(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
