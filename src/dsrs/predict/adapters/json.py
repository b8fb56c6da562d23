"""The JSON adapter: the outputs as one JSON object; a JSON schema response format where the LM supports it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ...types import Message
from .. import values
from ..signature import Signature
from .base import AdapterParseError, describe_fields, marked, typed


def output_schema(signature: Signature) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {f.name: values.schema(f.type) for f in signature.outputs},
        "required": [f.name for f in signature.outputs],
        "additionalProperties": False,
    }


def supports_schema(lm: Any) -> bool:
    """Structured output is used only when the LM's service says it has it (HTTP providers)."""
    return bool(getattr(getattr(lm, "service", None), "json_schema", False))


class JSONAdapter:
    name = "json"

    def system(self, signature: Signature) -> str:
        keys = ", ".join(json.dumps(f.name) for f in signature.outputs)
        return (
            f"{signature.instructions or signature.default_instructions()}\n\n{describe_fields(signature)}\n\n"
            f"Reply with one JSON object with exactly the keys {keys}, and nothing else."
        )

    def format(self, signature: Signature, inputs: Mapping[str, Any],
               demos: Sequence[Mapping[str, Any]] = ()) -> list[Message]:  # fmt: skip
        msgs = [Message.system(self.system(signature))]
        for d in demos:
            msgs.append(Message.user(marked(signature.inputs, d)))
            out = {f.name: values.jsonable(d[f.name]) for f in signature.outputs}
            msgs.append(Message.assistant(json.dumps(out, ensure_ascii=False)))
        msgs.append(Message.user(marked(signature.inputs, inputs)))
        return msgs

    def options(self, signature: Signature, lm: Any) -> dict[str, Any]:
        if not supports_schema(lm):
            return {}
        name = re.sub(r"[^A-Za-z0-9_-]", "_", signature.name)[:64] or "outputs"
        schema = {"name": name, "schema": output_schema(signature)}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}

    def parse(self, signature: Signature, text: str) -> dict[str, Any]:
        try:
            obj = values._json(text, "{")
        except ValueError as e:
            raise AdapterParseError(f"the answer is not a JSON object ({e})", raw=text, adapter=self.name) from None
        if not isinstance(obj, dict):
            raise AdapterParseError("the answer is not a JSON object", raw=text, adapter=self.name)
        out = {}
        for f in signature.outputs:
            if f.name not in obj:
                raise AdapterParseError(f"the JSON answer has no key {f.name!r}", raw=text, field=f.name,
                                        adapter=self.name)  # fmt: skip
            out[f.name] = typed(self.name, f, obj[f.name], text)
        return out
