"""Issue 17: what calibrating on the wrong traffic costs. SmolLM2-135M-Instruct (a chat model),
GPTQ and AWQ int4-g64, calibrated on (a) WikiText, (b) Python code, (c) chat conversations
rendered with the model's chat template — each scored with ``kl`` against the original on three
held-out texts (chat conversations rendered the same way, WikiText, Python code) and with
``calibration-mismatch`` (in: the held-out text of the calibration's own domain; out: the chat
text, or WikiText for the chat calibration).

Data (no network; ``benchmarks/make_chat_samples.py`` cut the conversations from ../shared/data):

* calibration — WikiText: the text of WikiText-2 test articles 12-39; Python: the core's
  ``python_calib.txt`` (CPython modules 29-32); chat: ``benchmarks/data/chat/chat-calib.jsonl``
  (modules 5-16 and articles 12-39 as conversations), one conversation per sequence;
* evaluation — chat: ``chat-eval.jsonl`` (modules 17-28, articles 40-61) rendered with the
  model's template and joined; WikiText: the core's ``english_eval.txt`` (articles 0-11);
  Python: the core's ``python_eval.txt`` (modules 1-4).

The calibration sets hold about the same number of tokens: the chat set's conversations
(``--chats`` of them, one per sequence, at most ``--seq-len`` tokens each) first, then as many
``--seq-len`` windows of each text as give as many tokens; ``chat-packed`` is the same
conversations packed into that many windows. Each seed draws other windows / conversations
(``--seeds``): the table gives the mean and the range over them.

    python benchmarks/calibration_mismatch.py [--device cuda] [--chats 128] [--seeds 0 1 2]
    python benchmarks/calibration_mismatch.py --table-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import quantfoundry as qf
from _common import parse_results_args, save_rows
from quantfoundry.data import default_calibration_text, default_eval_text, english_eval_text
from rtn_sweep import SHARED, model_folder

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cuda" / "calibration_mismatch_h100.json"
CHAT = HERE / "data" / "chat"
CALIBRATIONS = ("wikitext", "python", "chat", "chat-packed")
TEXTS = ("chat", "wikitext", "python")
METHODS = ("gptq", "awq")
FORMAT = "int4-g64"  # SmolLM2's 576-wide linears take no g128


def wiki_articles(first: int, last: int) -> str:
    """WikiText-2 test articles ``first``..``last - 1`` (raw, as the file has them)."""
    text = (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, flags=re.M)] + [len(text)]
    return text[starts[first]: starts[last]]


def chat_eval_text(tokenizer: Any) -> str:
    """The held-out conversations rendered with the model's template, one after the other."""
    lines = (CHAT / "chat-eval.jsonl").read_text(encoding="utf-8").splitlines()
    return "".join(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chats", type=int, default=128, help="chat conversations (sets the token budget)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (the sampling spread)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--calibrations", nargs="+", default=list(CALIBRATIONS), choices=CALIBRATIONS)
    parsed = parse_results_args(ap, RESULTS, table)
    if parsed is None:
        return
    args, rows = parsed
    folder = model_folder("smollm2-135m")
    source = qf.resolve_model(folder, check_weights=False)
    tok = source.tokenizer()
    work = Path(tempfile.mkdtemp(prefix="qf-calib-bench-"))
    (work / "wiki-calib.txt").write_text(wiki_articles(12, 40), encoding="utf-8")
    (work / "chat-eval.txt").write_text(chat_eval_text(tok), encoding="utf-8")
    eval_texts = {"chat": work / "chat-eval.txt", "wikitext": english_eval_text(), "python": default_eval_text()}

    chat_options = {"path": str(CHAT / "chat-calib.jsonl"), "n_samples": args.chats, "seq_len": args.seq_len}
    from quantfoundry.pipeline.preview import preview_calibration

    budget = preview_calibration(folder, "chat", chat_options).calibration.n_tokens
    windows = max(1, round(budget / args.seq_len))
    calibrations: dict[str, tuple[str, dict[str, Any]]] = {
        "wikitext": ("text", {"path": str(work / "wiki-calib.txt"), "n_samples": windows, "seq_len": args.seq_len}),
        "python": ("text", {"path": str(default_calibration_text()), "n_samples": windows, "seq_len": args.seq_len}),
        "chat": ("chat", chat_options),
        "chat-packed": ("chat", {**chat_options, "packing": True, "n_samples": windows}),
    }
    print(f"token budget: {budget} chat tokens, {windows} x {args.seq_len} text windows", flush=True)
    for seed, method, calib in itertools.product(args.seeds, args.methods, args.calibrations):
        key = f"{method}|{calib}|{seed}"
        if key in rows:
            continue
        name, options = calibrations[calib]
        options = {**options, "seed": seed}
        domain = "chat" if calib.startswith("chat") else calib
        in_domain = eval_texts[domain]
        out_domain = eval_texts["wikitext" if domain == "chat" else "chat"]
        evaluators: list[tuple[str, dict[str, Any]]] = [
            ("kl", {"path": str(eval_texts[t]), "max_tokens": args.eval_tokens}) for t in TEXTS]
        evaluators.append(("calibration-mismatch", {"in_domain": str(in_domain), "out_domain": str(out_domain),
                                                    "max_tokens": args.eval_tokens}))
        t0 = time.perf_counter()
        r = qf.run(str(folder), quantizer=method, format=FORMAT, calibrator=name, calibrator_options=options,
                   evaluators=evaluators, out=None, progress=False, device=args.device)
        seconds = time.perf_counter() - t0
        kl = {t: _pick(r.metrics, f"path={_short(eval_texts[t])}") for t in TEXTS}
        cm = next(v for k, v in r.metrics.items() if k.startswith("calibration-mismatch"))
        rows[key] = {"method": method, "calibration": calib, "seed": seed,
                     "tokens": r.manifest["calibration"]["tokens"],
                     "samples": r.manifest["calibration"]["samples"], "seconds": round(seconds, 1),
                     "kl": kl, "out_in_kl_ratio": cm["out_in_kl_ratio"]["quantized"],
                     "device": args.device}
        save_rows(args.results, rows)
        print(key, json.dumps(rows[key]), flush=True)
    print(table(rows))


def _short(path: Path) -> str:
    return Path(path).name


def _pick(metrics: dict[str, Any], tag: str) -> dict[str, float]:
    """The ``kl`` evaluator whose key names the text ``tag`` (``kl[path=...]``)."""
    for key, m in metrics.items():
        if key.startswith("kl[") and tag.split("=", 1)[1] in key:
            return {k: m[k]["quantized"] for k in ("kl_mean", "same_top1_pct", "ppl_quantized", "ppl_original")}
    raise KeyError(f"no kl result for {tag} in {list(metrics)}")


def table(rows: dict[str, Any]) -> str:
    """KL mean per evaluation text, the mean over the seeds measured (min-max when several)."""
    head = ("| method | calibrated on | tokens | seeds | KL chat (held out) | top-1 % | KL WikiText | top-1 % "
            "| KL Python | top-1 % | calibration-mismatch ratio |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        means = {c: _mean([r for r in rows.values() if r["method"] == method and r["calibration"] == c])
                 for c in CALIBRATIONS}
        means = {c: m for c, m in means.items() if m is not None}
        for calib, m in means.items():
            cells = []
            for t in TEXTS:
                best = min(v["kl"][t][0] for v in means.values())
                kl, lo, hi = m["kl"][t]
                mark = "**" if kl == best else ""
                spread = f" ({lo:.4f}-{hi:.4f})" if m["seeds"] > 1 else ""
                cells.append(f"{mark}{kl:.4f}{mark}{spread} | {m['top1'][t]:.2f}")
            lines.append(f"| {method} | {calib} | {m['tokens']:,} | {m['seeds']} | " + " | ".join(cells) +
                         f" | {m['ratio']:.2f} |")
    return "\n".join(lines)


def _mean(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rs:
        return None
    n = len(rs)
    kl = {t: (sum(r["kl"][t]["kl_mean"] for r in rs) / n, min(r["kl"][t]["kl_mean"] for r in rs),
              max(r["kl"][t]["kl_mean"] for r in rs)) for t in TEXTS}
    top1 = {t: sum(r["kl"][t]["same_top1_pct"] for r in rs) / n for t in TEXTS}
    return {"seeds": n, "tokens": round(sum(r["tokens"] for r in rs) / n), "kl": kl, "top1": top1,
            "ratio": sum(r["out_in_kl_ratio"] for r in rs) / n}


if __name__ == "__main__":
    sys.exit(main())
