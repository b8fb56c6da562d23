"""The completion adapter, for base models: few-shot `Field: value` blocks and stop sequences.

Base models (the embedded Gemma) continue text rather than follow instructions, so the prompt
is the demos written out as examples, then the new inputs and the first output's label:

    Question: What is the capital of Germany?
    Answer: Berlin

    Question: What is the capital of France?
    Answer:
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .. import values
from ..signature import Field, Signature
from .base import AdapterParseError, typed


def block(fields: Sequence[Field], row: Mapping[str, Any]) -> str:
    return "\n".join(f"{f.label}: {values.format(row[f.name])}" for f in fields)


class CompletionAdapter:
    name = "completion"

    def format(self, signature: Signature, inputs: Mapping[str, Any], demos: Sequence[Mapping[str, Any]] = ()) -> str:
        parts = [signature.instructions] if signature.instructions else []
        parts += [block(signature.fields, d) for d in demos]
        parts.append(block(signature.inputs, inputs) + f"\n{signature.outputs[0].label}:")
        return "\n\n".join(parts)

    def options(self, signature: Signature, lm: Any) -> dict[str, Any]:
        if len(signature.outputs) == 1:
            return {"stop": ("\n",)}
        return {"stop": ("\n\n", f"\n{signature.inputs[0].label}:")}

    def parse(self, signature: Signature, text: str) -> dict[str, Any]:
        outs = signature.outputs
        full = f"{outs[0].label}:{text}"
        labels = "|".join(re.escape(f.label) for f in outs)
        found = list(re.finditer(rf"^({labels}):", full, re.MULTILINE))
        by_label: dict[str, str] = {}
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(full)
            by_label.setdefault(m.group(1), full[m.end() : end].strip())
        result = {}
        for f in outs:
            v = by_label.get(f.label, "")
            if not v:
                raise AdapterParseError(f"the answer has no value for {f.label!r}", raw=text, field=f.name,
                                        adapter=self.name)  # fmt: skip
            result[f.name] = typed(self.name, f, v, text)
        return result
