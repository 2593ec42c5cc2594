"""Keep the tutorials' code the tested example's code, word for word:

    python docs/includes.py          # rewrite every included block from its file

In a page, ``<!-- include: PATH -->`` followed by a fenced block means the block *is* the file
at PATH (relative to the repository root); ``<!-- excerpt: PATH -->`` means the block's lines
are a contiguous run of that file's lines (indentation may be shifted as a whole).
``tests/test_docs.py`` fails on any block that differs, so the tutorials never show code that
was not tested.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("writing-a-plugin.md", "writing-a-block-quantizer.md")
MARKED = re.compile(r"<!-- (include|excerpt): (\S+) -->\n```(\w*)\n(.*?)```\n", re.S)


def problems(page: Path) -> list[str]:
    """What in ``page`` differs from the files it includes or quotes."""
    out = []
    text = page.read_text()
    for kind, path, _lang, body in MARKED.findall(text):
        source = (ROOT / path).read_text()
        if kind == "include" and body != source:
            out.append(f"{page.name}: the block included from {path} differs from the file (python docs/includes.py)")
        if kind == "excerpt" and not _is_excerpt(body, source):
            out.append(f"{page.name}: an excerpt of {path} is not a run of its lines:\n{body}")
    if "..." in "".join(body for _k, _p, _l, body in MARKED.findall(text)):
        out.append(f"{page.name}: a code block elides code with '...'")
    unmarked = len(re.findall(r"^```(python|toml)$", text, re.M)) - sum(
        1 for _k, _p, lang, _b in MARKED.findall(text) if lang in ("python", "toml"))
    if unmarked:
        out.append(f"{page.name}: {unmarked} python/toml block(s) neither included nor quoted from a tested file")
    return out


def _is_excerpt(body: str, source: str) -> bool:
    want = textwrap.dedent(body).rstrip("\n").splitlines()
    lines = source.splitlines()
    for i in range(len(lines) - len(want) + 1):
        if textwrap.dedent("\n".join(lines[i:i + len(want)])).splitlines() == want:
            return True
    return False


def rewrite(page: Path) -> None:
    def fill(m: re.Match[str]) -> str:
        kind, path, lang, body = m.groups()
        if kind == "include":
            body = (ROOT / path).read_text()
        return f"<!-- {kind}: {path} -->\n```{lang}\n{body}```\n"

    page.write_text(MARKED.sub(fill, page.read_text()))


if __name__ == "__main__":
    for name in PAGES:
        rewrite(Path(__file__).resolve().parent / name)
    found = [p for name in PAGES for p in problems(Path(__file__).resolve().parent / name)]
    print("\n".join(found) or "ok")
    sys.exit(1 if found else 0)
