"""The `dsrs` command.

  dsrs ask "question" [--model M | --lane L] [--stream]   answer one question (embedded model by default, offline)
  dsrs doctor                                             providers, keys, local servers, what auto-detect builds
  dsrs run SIGNATURE --input in.jsonl --output out.jsonl  batch Predict, resumable (by row content + signature)
  dsrs usage [--by model|lane|day|provider|program]      the usage ledger (--plot f: needs matplotlib)
  dsrs serve / dsrs pylon serve                           the gateway (dsrs.gateway), a swarm provider (dsrs.pylon.serve)

One module per command (ask, doctor, run, usage); show.py holds how they print.

Answers go to stdout, usage lines and progress to stderr. Errors print one line and exit non-zero;
`--debug` shows the traceback; Ctrl-C exits 130. Imports stay lazy so the command starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING, Any

from .ask import BASE_MAX_TOKENS, DEFAULT_MODEL
from .run import RUN_HELP

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = argparse.ArgumentParser(prog="dsrs", description="One LM layer for DSPy-style programs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"dsrs {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, help="`dsrs COMMAND --help` shows a command's options")

    ask = sub.add_parser("ask", help="answer one question (the embedded model by default, offline)",
                         description="Answer one question. The answer goes to stdout, the usage line"
                         " (model, tokens, cost) to stderr.")  # fmt: skip
    ask.add_argument("question", help="the question, quoted")
    who = ask.add_mutually_exclusive_group()
    who.add_argument("--model", "-m", help="provider/model, e.g. openai/gpt-4o-mini (default: %s)" % DEFAULT_MODEL)
    who.add_argument("--lane", "-l", help="a lane of LaneMux.auto_detect(): premium, fast, cheap, local")
    ask.add_argument("--max-tokens", type=int, metavar="N",
                     help=f"cap on the answer's tokens (default: {BASE_MAX_TOKENS} for a base model such as the embedded"
                     " one, none for chat models: reasoning models spend tokens thinking before they answer)")  # fmt: skip
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--quiet-usage", action="store_true", help=argparse.SUPPRESS)  # the usage line is always on stderr now

    doc = sub.add_parser("doctor", help="providers, keys, local servers and what auto-detect builds")
    doc.add_argument("--timeout", type=float, default=0.5, help="seconds per local probe")

    run = sub.add_parser("run", help="answer every row of a JSONL file with a signature (resumable)", description=RUN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    run.add_argument("signature", help="'question -> answer' or module:SignatureClass")
    run.add_argument("--input", "-i", required=True, metavar="IN.jsonl", help="one JSON object per line, with the signature's inputs")
    run.add_argument("--output", "-o", required=True, metavar="OUT.jsonl",
                     help="the answered rows (created, or resumed when it exists); never the input")  # fmt: skip
    run.add_argument("--concurrency", "-c", type=int, default=4, help="rows answered at a time (default: 4)")
    run.add_argument("--demos", metavar="DEMOS.jsonl", help="JSONL of examples with every field")
    who = run.add_mutually_exclusive_group()
    who.add_argument("--model", "-m", help="provider/model (default: %s)" % DEFAULT_MODEL)
    who.add_argument("--lane", "-l", help="a lane of LaneMux.auto_detect(): premium, fast, cheap, local")
    run.add_argument("--max-tokens", type=int, help="cap on each answer's tokens (default: the model's own)")
    run.add_argument("--drop-stale", action="store_true",
                     help="discard answers in the output that match no input row under this signature (see above)")  # fmt: skip
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip

    use = sub.add_parser("usage", help="the usage ledger: calls, tokens and msats")
    use.add_argument("--by", choices=("model", "lane", "day", "provider", "program"), default="model",
                     help="group the calls by this (default: model)")  # fmt: skip
    use.add_argument("--days", type=float, help="only the last N days")
    use.add_argument("--plot", metavar="OUT.png", help="draw cost and tokens per day (needs matplotlib)")

    from ..gateway.__main__ import add_arguments

    add_arguments(sub.add_parser("serve", help="an OpenAI-compatible gateway over dsrs lanes"))

    pylon = sub.add_parser("pylon", help="Pylon (NIP-90): `dsrs pylon serve --help` sells a model to the swarm")
    pylon.add_argument("action", choices=("serve",), help="serve: sell a model's answers to the swarm")
    pylon.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of `dsrs pylon serve`")
    return p


async def _serve(args: argparse.Namespace) -> int:
    from ..gateway.__main__ import arun

    return await arun(args)


def _pylon(args: argparse.Namespace) -> int:
    from ..pylon.serve import main as pylon_serve

    return pylon_serve(args.rest)  # runs its own event loop


_COMMANDS = ("ask", "doctor", "run", "usage")  # each a module here with an async function of its name


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "pylon":
            return _pylon(args)
        from .. import _sync

        if args.cmd == "serve":
            return _sync.run(_serve(args))
        module = importlib.import_module(f".{args.cmd}", __name__)
        command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = getattr(module, args.cmd)
        return _sync.run(command(args))
    except KeyboardInterrupt:
        print("dsrs: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from ..errors import DsrsError

        msg = str(e) if isinstance(e, DsrsError) else f"{type(e).__name__}: {e}"
        print(f"dsrs: {' '.join(msg.split())}", file=sys.stderr)
        return 1

