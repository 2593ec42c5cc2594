"""The ``chat`` calibrator: conversations from a JSONL file, rendered with the model's chat template.

Each line of ``path`` is one conversation (:mod:`.conversations` says which shapes); the
conversations are taken in an order drawn from ``seed``, rendered with the model's own chat
template (or ``chat_template``) and tokenized, then turned into sequences one conversation
each or packed (:mod:`.sampling`). A tokenizer without a chat template is refused before any
work, with the option that supplies one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import quantfoundry as qf
from quantfoundry.errors import UsageError
from quantfoundry.toolkit import read_jsonl

from .conversations import ChatOptions, Renderer, conversation
from .sampling import SamplingOptions, assemble, seeded_order


@dataclass(frozen=True, kw_only=True)
class ChatCalibratorOptions(SamplingOptions, ChatOptions):
    path: Path | None = field(default=None, metadata={
        "help": "a .jsonl file, one conversation per line: {\"messages\": [...]} or {\"prompt\", \"response\"}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path is None:
            raise ValueError("path is required: a .jsonl file of conversations (--calibrator-opt path=chats.jsonl)")


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """Every conversation of a JSONL file, checked (one line per error, naming file and line)."""
    out = [conversation(record, f"{path}:{i}") for i, record in read_jsonl(path)]
    if not out:
        raise UsageError(f"{path} holds no conversation; write one JSON object per line")
    return out


class ChatCalibrator(qf.Calibrator):
    name = "chat"
    description = "conversations from a JSONL file, rendered with the model's chat template"
    Options = ChatCalibratorOptions

    options: ChatCalibratorOptions

    def load(self, tokenizer: Any) -> qf.CalibrationSet:
        o = self.options
        path = cast(Path, o.path)  # required by the options
        renderer = Renderer(tokenizer, o, owner="calibrator 'chat'")
        chats = read_conversations(path)

        def documents() -> Iterator[tuple[str, list[int]]]:
            for index in seeded_order(len(chats), o.seed):
                text = renderer.render(chats[index], f"{path}:conversation {index + 1}")
                if text is not None:
                    yield text, renderer.tokenize(text)

        return assemble(documents(), o, source=str(path), eos_id=tokenizer.eos_token_id,
                        info={"conversations": len(chats)})
