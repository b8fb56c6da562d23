"""`dsrs serve --config dsrs.toml [--host 127.0.0.1 --port 8088]` (also `python -m dsrs.gateway`);
`dsrs serve --init [PATH]` writes a sample config (`sample.toml` beside this file) to edit."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="the gateway's TOML config (see dsrs.gateway.config)")
    p.add_argument("--init", nargs="?", const="dsrs.toml", metavar="PATH",
                   help="write a sample config to PATH (default dsrs.toml; never over an existing file) and exit")  # fmt: skip
    p.add_argument("--host", help="address to listen on (default: [gateway] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: [gateway] port, else 8088; 0: any free port, printed)")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")


async def arun(args: argparse.Namespace) -> int:
    """`dsrs serve`: load the config, serve until SIGINT/SIGTERM. Config errors exit with status 2."""
    from ..errors import DsrsError
    from .app import serve
    from .config import load

    if args.init:
        return _init(args.init)
    if not args.config:
        print("dsrs serve: no config given: pass --config dsrs.toml, or write a sample with `dsrs serve --init`",
              file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load(args.config)
        await serve(cfg, args.host, args.port)
    except DsrsError as e:
        print(f"dsrs serve: {e}", file=sys.stderr)
        return 2
    return 0


def _init(path: str) -> int:
    """Write the sample config to `path`, refusing to overwrite anything."""
    from importlib.resources import files

    text = files(__package__).joinpath("sample.toml").read_text()
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        print(f"dsrs serve --init: {path} already exists; not overwritten (give another path)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dsrs serve --init: cannot write {path}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {path}: edit its lanes and keys, export DSRS_CLIENT_KEY (and the lanes' provider keys), "
          f"then run `dsrs serve --config {path}`")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsrs serve", description="An OpenAI-compatible gateway over dsrs lanes.")
    add_arguments(p)
    import asyncio

    return asyncio.run(arun(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
