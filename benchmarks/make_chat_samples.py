"""Write the chat samples of the calibration benchmark and tests (``benchmarks/data/chat/``).

No network: every conversation is cut from texts under ``../shared/data``:

* **code** — functions with a docstring from the CPython sample
  (``python-code/cpython311_stdlib_sample.py``): "write a function with this docstring" →
  the function, or "explain this function" → its docstring;
* **prose** — WikiText-2 test articles: "tell me about TITLE" → the article's opening, or
  "summarise the section S of the article on TITLE" → that section.

Calibration and held-out conversations come from disjoint parts: calibration from CPython
modules 5-16 and WikiText articles 12-39, held-out from modules 17-28 and articles 40 on. Both
stay disjoint from the core's evaluation texts (``python_eval.txt``: modules 1-4;
``english_eval.txt``: articles 0-11) and from the Python calibration text
(``python_calib.txt``: modules 29-32). Every fifth conversation has a system prompt.

    python benchmarks/make_chat_samples.py            # rewrites benchmarks/data/chat/*.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QF_SHARED", ROOT.parent / "shared"))
OUT = ROOT / "benchmarks" / "data" / "chat"
SYSTEM = "You are a helpful assistant. Answer accurately and concisely."
MAX_CHARS = 1500


def modules(path: Path) -> list[tuple[str, str]]:
    """``(module path, source)`` of every module in the CPython sample, in file order."""
    text = path.read_text(encoding="utf-8")
    parts = re.split(r"^# ===== file: (\S+) \(CPython 3\.11\.7\) =====\n", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def code_conversations(module: str, source: str) -> list[dict]:
    """One conversation per top-level or method function with a docstring (short enough)."""
    out = []
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 40 or node.name.startswith("__"):
            continue
        body = "\n".join(lines[node.lineno - 1 - len(node.decorator_list): node.end_lineno])
        body = _dedent(body)
        if len(body) > MAX_CHARS:
            continue
        if len(out) % 2 == 0:
            prompt = (f"Write a Python function `{node.name}` (it belongs in {module}) with this docstring:\n\n"
                      f"{doc}")
            response = f"```python\n{body}\n```"
        else:
            prompt = f"Explain what this Python function from {module} does:\n\n```python\n{body}\n```"
            response = doc
        out.append({"prompt": prompt, "response": response})
    return out


def _dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)


def articles(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(title, [(section, text)])`` of every WikiText article (the opening's section is '')."""
    out: list[tuple[str, list[tuple[str, str]]]] = []
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r" = ([^=].*) = ", line)
        if m:
            out.append((detok(m.group(1)), []))
            section = ""
            continue
        m = re.fullmatch(r" (= )+(.*?)( =)+ ", line)
        if m:
            section = detok(m.group(2))
            continue
        if line.strip() and out:
            out[-1][1].append((section, detok(line.strip())))
    return out


def detok(text: str) -> str:
    """WikiText's tokenized spacing back to plain prose."""
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" 's", "'s"), ("( ", "("), (" )", ")"),
                 (" , ", ", "), (" . ", ". "), (" ; ", "; "), (" : ", ": "), (" n't", "n't")):
        text = text.replace(a, b)
    return re.sub(r" ([.,;:!?])(\s|$)", r"\1\2", text).strip()


def prose_conversations(title: str, paragraphs: list[tuple[str, str]]) -> list[dict]:
    """The opening as "tell me about", then up to two sections as "summarise"."""
    out = []
    opening = " ".join(p for s, p in paragraphs if s == "")[:MAX_CHARS]
    if len(opening) > 200:
        out.append({"prompt": f"Tell me about {title}.", "response": _cut(opening)})
    sections: dict[str, list[str]] = {}
    for s, p in paragraphs:
        if s:
            sections.setdefault(s, []).append(p)
    for s, ps in list(sections.items())[:2]:
        text = " ".join(ps)
        if len(text) > 200:
            out.append({"prompt": f"Summarise the section \"{s}\" of the article on {title}.",
                        "response": _cut(text[:MAX_CHARS])})
    return out


def _cut(text: str) -> str:
    """End at the last full sentence."""
    end = text.rfind(". ")
    return text[: end + 1] if end > len(text) // 2 else text


def build(shared: Path) -> dict[str, list[dict]]:
    mods = modules(shared / "data" / "python-code" / "cpython311_stdlib_sample.py")
    arts = articles(shared / "data" / "wikitext-2-raw" / "wiki.test.raw")
    sets: dict[str, list[dict]] = {"calib": [], "eval": []}
    for split, mod_range, art_range in (("calib", range(4, 16), range(12, 40)),
                                        ("eval", range(16, 28), range(40, len(arts)))):
        code = [c for i in mod_range for c in code_conversations(*mods[i])]
        prose = [c for i in art_range for c in prose_conversations(*arts[i])]
        # interleave, so that any prefix holds both kinds
        mixed = [c for pair in zip(code, prose, strict=False) for c in pair]
        mixed += code[len(prose):] + prose[len(code):]
        for i, c in enumerate(mixed):
            messages = [{"role": "user", "content": c["prompt"]}, {"role": "assistant", "content": c["response"]}]
            if i % 5 == 0:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            sets[split].append({"messages": messages})
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, conversations in build(args.shared).items():
        path = args.out / f"chat-{split}.jsonl"
        path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations), encoding="utf-8")
        print(f"{path}: {len(conversations)} conversations, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
