"""An Ollama ``Modelfile`` beside every GGUF: ``FROM``, the chat template translated to Ollama's
Go-template form, the default system prompt, and a ``PARAMETER stop`` for every end-of-generation
token — without them Ollama's answers ramble past their end.

The translation reads the model's Jinja chat template through transformers
(``apply_chat_template``) on probe conversations and finds what wraps each role's message
(``<|im_start|>user\\n`` … ``<|im_end|>\\n``), the generation prompt, and a default system
message the template adds when none is given. The Go template it writes loops over the
messages with one branch per role. It is kept only when it renders the same text as
transformers for a two-turn conversation, with and without a system message (the
:func:`render` below interprets exactly the Go-template subset written here); otherwise the
Modelfile has no ``TEMPLATE`` and Ollama falls back to the GGUF's own template, with a note.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBES = {"system": "QFSYSTEMQF", "user1": "QFUSERONEQF", "assistant1": "QFASSISTANTONEQF", "user2": "QFUSERTWOQF"}
#: token texts llama.cpp treats as end of generation by name (llama-vocab.cpp), beside EOS/EOT ids
LLAMA_CPP_EOG = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>", "<|end_of_text|>",
                 "<|eom_id|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>")


@dataclass
class RoleWrappers:
    """What surrounds each role's content, the generation prompt, and the default system text."""

    user: tuple[str, str]
    assistant: tuple[str, str]
    system: tuple[str, str] | None
    default_system: str | None
    bos: str

    def go_template(self) -> str:
        branches = []
        if self.system is not None:
            branches.append(("system", self.system))
        branches += [("user", self.user), ("assistant", self.assistant)]
        body = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{start}{{{{ .Content }}}}{end}'
                       for i, (role, (start, end)) in enumerate(branches))
        return f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{self.assistant[0]}"


def _render_hf(tokenizer: Any, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _between(text: str, left: str, right: str) -> str:
    i = text.index(left) + len(left)
    return text[i:text.index(right, i)]


def _adds_bos(tokenizer: Any) -> bool:
    """True when tokenizing adds the BOS token (llama.cpp and Ollama then add it to the prompt
    themselves, so the template must not)."""
    if not tokenizer.bos_token:
        return False
    ids = tokenizer("x").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def wrappers(tokenizer: Any) -> RoleWrappers:
    """The role wrappers of ``tokenizer``'s chat template, found by rendering probe conversations.
    Raises ``ValueError`` when the template does not follow a per-role wrapping."""
    p = PROBES
    u1 = [{"role": "user", "content": p["user1"]}]
    ua = u1 + [{"role": "assistant", "content": p["assistant1"]}]
    uau = ua + [{"role": "user", "content": p["user2"]}]
    r_u, r_u_gen = _render_hf(tokenizer, u1, False), _render_hf(tokenizer, u1, True)
    r_ua, r_uau = _render_hf(tokenizer, ua, False), _render_hf(tokenizer, uau, True)
    if not r_u_gen.startswith(r_u):
        raise ValueError("the generation prompt is not appended to the conversation")
    gen = r_u_gen[len(r_u):]
    before_u1, user_end = r_u.split(p["user1"])
    if not _between(r_uau, p["user1"], p["assistant1"]) == user_end + gen:
        raise ValueError("the assistant's turn does not start with the generation prompt")
    assistant_end = r_ua.split(p["assistant1"])[1]
    mid = _between(r_uau, p["assistant1"], p["user2"])
    if not mid.startswith(assistant_end):
        raise ValueError("what ends an assistant turn differs inside and at the end of a conversation")
    user_start = mid[len(assistant_end):]
    if not before_u1.endswith(user_start):
        raise ValueError("the first user message is wrapped differently from the others")
    prefix = before_u1[:len(before_u1) - len(user_start)]
    bos = tokenizer.bos_token if _adds_bos(tokenizer) and prefix.startswith(tokenizer.bos_token) else ""
    system: tuple[str, str] | None = None
    default: str | None = None
    try:
        r_su = _render_hf(tokenizer, [{"role": "system", "content": p["system"]}] + u1, False)
    except Exception:  # the template has no system role (Gemma): system messages are not written
        r_su = None
    if r_su is not None and p["system"] in r_su:
        sys_before, rest = r_su.split(p["system"])
        sys_end_and_user = rest.split(p["user1"])[0]
        if sys_before.startswith(bos) and sys_end_and_user.endswith(user_start):
            system = (sys_before[len(bos):], sys_end_and_user[:len(sys_end_and_user) - len(user_start)])
            leftover = prefix[len(bos):]
            if leftover:
                m = re.fullmatch(re.escape(system[0]) + "(.*)" + re.escape(system[1]), leftover, re.S)
                if m is None:
                    raise ValueError("the template adds text before the first user message that is no system message")
                default = m.group(1)
    elif prefix[len(bos):]:
        raise ValueError("the template adds text before the first user message")
    return RoleWrappers((user_start, user_end), (gen, assistant_end), system, default, bos)


# -- the Go-template subset written above, interpreted --------------------------------------------

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def render(template: str, messages: list[dict[str, str]]) -> str:
    """Render ``template`` — text, ``{{ range .Messages }}``, ``{{ if eq .Role "x" }}`` /
    ``{{ else if eq .Role "x" }}`` / ``{{ else }}`` / ``{{ end }}``, ``{{ .Content }}`` — the way Go's
    text/template does (whitespace trimming is not used by what this module writes, so not
    supported: a ``{{-`` is an error)."""
    if "{{-" in template or "-}}" in template:
        raise ValueError("whitespace-trimming actions are not supported")
    tokens: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            tokens.append(("text", template[pos:m.start()]))
        tokens.append(("action", m.group(1)))
        pos = m.end()
    if pos < len(template):
        tokens.append(("text", template[pos:]))
    out: list[str] = []

    def run(i: int, message: dict[str, str] | None, emit: bool) -> int:
        """Run tokens from ``i`` until an unmatched ``end``/``else``; return its index."""
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "text":
                if emit:
                    out.append(value)
                i += 1
            elif value == ".Content":
                if emit:
                    out.append("" if message is None else message["content"])
                i += 1
            elif value == "range .Messages":
                end = i + 1
                for msg in messages if emit else [None]:
                    end = run(i + 1, msg, emit)
                if not messages and emit:
                    end = run(i + 1, None, False)
                i = end + 1
            elif value.startswith("if "):
                i = branch(i, value[3:], message, emit)
            elif value == "end" or value == "else" or value.startswith("else if "):
                return i
            else:
                raise ValueError(f"unsupported action {{{{ {value} }}}}")
        return i

    def branch(i: int, cond: str, message: dict[str, str] | None, emit: bool) -> int:
        taken = False
        while True:
            ok = emit and not taken and _condition(cond, message)
            i = run(i + 1, message, ok)
            taken = taken or ok
            kind, value = tokens[i]
            if value == "end":
                return i + 1
            cond = value[len("else if "):] if value.startswith("else if ") else "true"

    def _condition(cond: str, message: dict[str, str] | None) -> bool:
        if cond == "true":
            return True
        m = re.fullmatch(r'eq \.Role "([^"]*)"', cond)
        if m is None:
            raise ValueError(f"unsupported condition {cond!r}")
        return message is not None and message["role"] == m.group(1)

    end = run(0, None, True)
    if end != len(tokens):
        raise ValueError("unbalanced {{ end }}")
    return "".join(out)


# -- the Modelfile -------------------------------------------------------------------------------

def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('text holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def stop_tokens(tokenizer: Any, folder: Path, wrappers_: RoleWrappers | None) -> list[str]:
    """Every end-of-generation token: EOS, the generation config's EOS ids, and the token that ends
    an assistant turn in the chat template."""
    found: list[str] = []
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    gen = folder / "generation_config.json"
    if gen.is_file():
        try:
            ids = json.loads(gen.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            ids = None
        for i in ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else []:
            text = tokenizer.convert_ids_to_tokens(int(i))
            if text:
                found.append(text)
    if wrappers_ is not None:
        end = wrappers_.assistant[1].strip()
        if end and tokenizer.convert_tokens_to_ids(end) not in (None, tokenizer.unk_token_id):
            found.append(end)
    return list(dict.fromkeys(found))


def conversation(system: str | None = None) -> list[dict[str, str]]:
    """The two-turn conversation the translation is checked on."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                   {"role": "user", "content": "And 3+3?"}]


def modelfile(tokenizer: Any, folder: Path, gguf_name: str = "model.gguf") -> tuple[str, list[str]]:
    """The Modelfile text for ``tokenizer`` (the model's, from its folder ``folder``), and notes."""
    notes: list[str] = []
    lines = [f"FROM ./{gguf_name}"]
    wrapped: RoleWrappers | None = None
    if getattr(tokenizer, "chat_template", None):
        try:
            wrapped = wrappers(tokenizer)
            verify(tokenizer, wrapped)
        except Exception as exc:  # a template this translation cannot express: Ollama reads the GGUF's
            notes.append(f"Modelfile: the chat template was not translated ({exc}); Ollama uses the GGUF's own")
            wrapped = None
    else:
        notes.append("Modelfile: the model has no chat template; Ollama will send prompts as they are")
    if wrapped is not None:
        lines.append(f"TEMPLATE {_quote(wrapped.go_template())}")
        if wrapped.default_system:
            lines.append(f"SYSTEM {_quote(wrapped.default_system)}")
    for stop in stop_tokens(tokenizer, folder, wrapped):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    return "\n".join(lines) + "\n", notes


def verify(tokenizer: Any, wrapped: RoleWrappers) -> None:
    """The Go template renders transformers' prompt for the two-turn conversation, with and
    without a system message (Ollama inserts the SYSTEM default when the user gives none)."""
    template = wrapped.go_template()
    cases = [conversation(), conversation("Be brief.")] if wrapped.system is not None else [conversation()]
    for msgs in cases:
        want = _render_hf(tokenizer, msgs, True)
        given = msgs if msgs[0]["role"] == "system" or wrapped.default_system is None else \
            [{"role": "system", "content": wrapped.default_system}, *msgs]
        got = wrapped.bos + render(template, given)
        if got != want:
            raise ValueError(f"the translated template renders {got[:80]!r}..., transformers {want[:80]!r}...")
