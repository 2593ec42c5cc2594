"""Conversations: reading them from records, and rendering them with a chat template.

A record is a conversation in one of two shapes:

* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
* ``{"prompt": "...", "response": "..."}`` (``response`` optional; ``system`` optional), read
  as a system, a user and an assistant message.

Rendering is transformers' ``apply_chat_template`` with the model's own template (or the
file ``chat_template``), so the calibration tokens are exactly the ones the model sees when
it serves the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import quantfoundry as qf
from quantfoundry.errors import UsageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, kw_only=True)
class ChatOptions(qf.Options):
    """How conversations are rendered (the ``chat`` calibrator, and ``hf-dataset``'s messages)."""

    system_prompt: str | None = field(default=None, metadata={
        "help": "a system message put first in every conversation that has none"})
    include_assistant: bool = field(default=True, metadata={
        "help": "keep the assistant turns; false: each conversation up to its last user turn (the prompt)"})
    add_generation_prompt: bool | None = field(default=None, metadata={
        "help": "end with the template's assistant header (default: when include_assistant is false)"})
    chat_template: Path | None = field(default=None, metadata={
        "help": "a Jinja chat template file, for a model without one (or to override its own)"})


def conversation(record: Any, where: str) -> list[dict[str, str]]:
    """The messages of a record (``where`` names it in errors: ``file.jsonl:12``)."""
    if isinstance(record, dict) and "messages" in record:
        return messages_of(record["messages"], where)
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        out = []
        if isinstance(record.get("system"), str):
            out.append({"role": "system", "content": record["system"]})
        out.append({"role": "user", "content": record["prompt"]})
        if record.get("response") is not None:
            if not isinstance(record["response"], str):
                raise UsageError(f"{where}: 'response' must be a string")
            out.append({"role": "assistant", "content": record["response"]})
        return out
    raise UsageError(f"{where} is no conversation; give each line {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}} "
                     "or {\"prompt\": ..., \"response\": ...}")


def messages_of(messages: Any, where: str) -> list[dict[str, str]]:
    """Check a ``messages`` list: dicts with a known role and string content."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: message {i} must be {{\"role\": system|user|assistant, \"content\": string}}, "
                             f"got {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class Renderer:
    """Renders conversations to text with a tokenizer's chat template, as :class:`ChatOptions` say."""

    def __init__(self, tokenizer: Any, options: ChatOptions, owner: str):
        self.tokenizer = tokenizer
        self.options = options
        self.template: str | None = None
        if options.chat_template is not None:
            self.template = options.chat_template.read_text(encoding="utf-8")
        elif not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"the model's tokenizer has no chat template; pass one with --calibrator-opt "
                             f"chat_template=FILE.jinja ({owner}), or calibrate on plain text (--calibrator text)")
        self.add_generation_prompt = (not options.include_assistant if options.add_generation_prompt is None
                                      else options.add_generation_prompt)

    def messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
        """The messages that are rendered (system prompt added, assistant turns cut); None: nothing left."""
        o = self.options
        if o.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": o.system_prompt}, *messages]
        if not o.include_assistant:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                return None
            messages = messages[: users[-1] + 1]
        return messages

    def render(self, messages: list[dict[str, str]], where: str) -> str | None:
        """The conversation as the model sees it (None when it has no user turn to keep)."""
        from jinja2 import TemplateError

        kept = self.messages(messages)
        if kept is None:
            return None
        try:
            return self.tokenizer.apply_chat_template(kept, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=self.add_generation_prompt)
        except TemplateError as exc:
            raise UsageError(f"{where}: the chat template refused this conversation ({exc})") from None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a rendered conversation (the template writes the special tokens itself)."""
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
