"""The `dsrs` command. `dsrs ask "question"` answers on the embedded model, offline, by default."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# Few-shot frame for base models (Gemma 3 270M follows examples, not instructions).
_FEW_SHOT = (
    "Question: What is the capital of Germany?\nAnswer: Berlin\n\n"
    "Question: What color is the sky on a clear day?\nAnswer: Blue\n\n"
    "Question: {question}\nAnswer:"
)


def _ask(args: argparse.Namespace) -> int:
    from .lm import LM

    model = args.model or "embedded/gemma-3-270m"
    lm = LM(model, max_tokens=args.max_tokens)
    if lm.local and lm.provider == "embedded":
        prompt: Any = _FEW_SHOT.format(question=args.question.strip())
        lm = lm.with_stop("\n").with_temperature(0.0)
    else:
        prompt = args.question
    if args.stream:
        end = None
        for chunk in lm.stream(prompt):
            if isinstance(chunk, str):
                print(chunk, end="", flush=True)
            else:
                end = chunk.completion
        print()
        c = end
    else:
        c = lm(prompt)
        print(c.text.strip())
    assert c is not None
    u = c.usage
    cost = "unknown (no price for this model)" if u.cost_msats is None else f"{u.cost_msats} msats"
    print(
        f"[{c.provider}/{c.model}] tokens: {u.prompt_tokens} prompt + {u.completion_tokens} completion"
        f" = {u.total_tokens}; cost: {cost}" + (" (cache hit)" if u.cache_hit else ""),
        file=sys.stderr if args.quiet_usage else sys.stdout,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsrs", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ask = sub.add_parser("ask", help="answer one question (embedded model by default, offline)")
    ask.add_argument("question")
    ask.add_argument("--model", "-m", help="provider/model, e.g. openai/gpt-4o-mini")
    ask.add_argument("--max-tokens", type=int, default=64)
    ask.add_argument("--stream", action="store_true")
    ask.add_argument("--quiet-usage", action="store_true", help="print the usage line on stderr")
    args = parser.parse_args(argv)
    try:
        return _ask(args)
    except Exception as e:
        if args.debug:
            raise
        from .errors import DsrsError

        kind = type(e).__name__
        msg = str(e) if isinstance(e, DsrsError) else f"{kind}: {e}"
        print(f"dsrs: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
