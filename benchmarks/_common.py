"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def core_version() -> dict[str, Any]:
    """The commit measured, and a hash of uncommitted changes under core/ (if any)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
    diff = git("diff", "HEAD", "--", "core")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "core_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else None}


def cpu_name() -> str:
    """The CPU model, for the machine line of a benchmark."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_rows(path: Path) -> dict[str, Any]:
    """The ``rows`` of a resumable results file (empty when it does not exist yet)."""
    return json.loads(path.read_text())["rows"] if path.exists() else {}


def save_rows(path: Path, rows: dict[str, Any]) -> None:
    """Write ``rows`` with the machine, torch version and commit they were measured at."""
    import torch

    path.write_text(json.dumps({"machine": cpu_name(), "torch": torch.__version__, **core_version(),
                                "rows": rows}, indent=1))


def parse_results_args(ap: Any, default: Path, table: Any) -> tuple[Any, dict[str, Any]] | None:
    """Add ``--results`` (a resumable rows file, default ``default``) and ``--table-only`` to the
    argparse parser ``ap`` and parse; returns ``(args, rows)``, or ``None`` after printing
    ``table(rows)`` when ``--table-only`` was given."""
    ap.add_argument("--results", type=Path, default=default, help="rows file (resumable)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    rows = load_rows(args.results)
    if args.table_only:
        print(table(rows))
        return None
    return args, rows


def kl_pair_table(rows: dict[str, Any], time_header: str, digits: int = 2) -> str:
    """Markdown rows ``model|grid|method`` → KL and top-1 agreement on the held-out Python text
    and on WikiText, and the row's ``seconds`` under ``time_header``."""
    lines = [f"| model | grid | method | KL Python (held out) | top-1 % | KL WikiText | top-1 % | {time_header} |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        model, grid, method = key.split("|")
        a, b = r["python"], r["wikitext"]
        lines.append(f"| {model} | {grid} | {method} | {a['kl_mean']:.4f} | {a['same_top1_pct']:.2f} | "
                     f"{b['kl_mean']:.4f} | {b['same_top1_pct']:.2f} | {r['seconds']:.{digits}f} |")
    return "\n".join(lines)
