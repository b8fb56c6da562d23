"""The chat adapter: fields under `[[ name ]]` marker lines, demos as user/assistant turns."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ...types import Message
from ..signature import Signature
from .base import AdapterParseError, describe_fields, marked, marker, typed

END = "end"
_MARKER = re.compile(r"\[\[[ \t]*(\w+)[ \t]*\]\]")


class ChatAdapter:
    name = "chat"

    def system(self, signature: Signature) -> str:
        layout = "\n\n".join(f"{marker(f.name)}\n<{f.name}>" for f in signature.outputs)
        return (
            f"{signature.instructions or signature.default_instructions()}\n\n{describe_fields(signature)}\n\n"
            f"Reply with each output under its marker line, in this order, then {marker(END)}:\n\n"
            f"{layout}\n\n{marker(END)}"
        )

    def format(self, signature: Signature, inputs: Mapping[str, Any],
               demos: Sequence[Mapping[str, Any]] = ()) -> list[Message]:  # fmt: skip
        outs = ", ".join(marker(f.name) for f in signature.outputs)
        ask = f"\n\nReply with {outs}, then {marker(END)}."
        msgs = [Message.system(self.system(signature))]
        for d in demos:
            msgs.append(Message.user(marked(signature.inputs, d) + ask))
            msgs.append(Message.assistant(marked(signature.outputs, d) + f"\n\n{marker(END)}"))
        msgs.append(Message.user(marked(signature.inputs, inputs) + ask))
        return msgs

    def parse(self, signature: Signature, text: str) -> dict[str, Any]:
        sections: dict[str, str] = {}
        found = list(_MARKER.finditer(text))
        for i, m in enumerate(found):
            if m.group(1) == END:
                break
            end = found[i + 1].start() if i + 1 < len(found) else len(text)
            sections.setdefault(m.group(1), text[m.end() : end].strip())
        out = {}
        for f in signature.outputs:
            if f.name not in sections:
                raise AdapterParseError(f"the answer has no {marker(f.name)} section", raw=text, field=f.name,
                                        adapter=self.name)  # fmt: skip
            out[f.name] = typed(self.name, f, sections[f.name], text)
        return out
