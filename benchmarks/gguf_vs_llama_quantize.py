"""GGUF: qf's ``gguf`` exporter against llama.cpp's ``llama-quantize``, file type by file type.

For each model and llama.cpp file type, with and without an importance matrix:

* **llama.cpp**: ``convert_hf_to_gguf.py MODEL --outtype f16`` once per model (timed once), one
  ``llama-imatrix`` file per model (first 40,000 characters of the model's text, ctx 256, at
  most 40 chunks), then ``llama-quantize [--imatrix imatrix.gguf] base-f16.gguf theirs.gguf TYPE 2``,
  wall time best of ``--repeats``;
* **qf**: ``quantfoundry.run(MODEL, exporter="gguf", exporter_options={"type": TYPE[, "imatrix":
  the same file]}, evaluators=[], out=...)``, wall time best of ``--repeats`` (loading the
  safetensors, quantizing and writing ``model.gguf``; no conversion step);
* **files**: tensors of equal type and bytes (``gguf.GGUFReader``), file sizes, bits per weight
  of the whole file (8 × tensor bytes / elements);
* **quality, by llama.cpp**: ``llama-perplexity`` (ctx 512, 20 chunks) on the model's text, and
  KL divergence / same top token against the F16 base. A file whose tensors (names, types,
  bytes) equal an already-scored file's is not scored again: its figures are those of the first
  one (``quality_shared_with`` in the JSON says so).

Where some tensors differ, the script also quantizes an F16-rounded copy of the checkpoint with
qf and compares again (``f16_check``), to test whether the difference comes from llama.cpp's F16
intermediate.

    python benchmarks/gguf_vs_llama_quantize.py                               # everything, ~14 min on 2 cores
    python benchmarks/gguf_vs_llama_quantize.py --models pycode-7m --types Q4_K_M Q2_K
    python benchmarks/gguf_vs_llama_quantize.py --table-only                  # re-render the markdown

Rows measured by a run replace the same rows in ``results/gguf_vs_llama_quantize.json``; others
are kept.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import quantfoundry
import torch
from _common import core_version, cpu_name
from qf_gguf.exporter import gguf_name, permute_rows
from quantfoundry.data import default_model_path
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
RESULTS = HERE / "results" / "gguf_vs_llama_quantize.json"
TABLE = HERE / "results" / "gguf_vs_llama_quantize.md"
BUILD_LLAMA = SHARED / "tools" / "build-llama-cpp.sh"
SMOLLM2_BUILD = SHARED / "models" / "smollm2-135m-instruct-q4_1-dequant" / "build.sh"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
PYCODE = SHARED / "data" / "python-code" / "cpython311_stdlib_sample.py"

MODELS = ["pycode-7m", "smollm2-135m", "llama-1.5g"]
TEXT_OF = {"pycode-7m": PYCODE, "smollm2-135m": WIKITEXT, "llama-1.5g": PYCODE}
#: random weights (speed.py's 1.5B Llama): bytes and time only, no perplexity worth scoring
NO_QUALITY = {"llama-1.5g"}
ALL_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]
DEFAULT_TYPES = {"pycode-7m": ALL_TYPES, "smollm2-135m": ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"],
                 "llama-1.5g": ["Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]}
THREADS = 2
CALIB_CHARS = 40_000
IMATRIX_ARGS = ["-c", "256", "--chunks", "40", "-t", str(THREADS)]
PPL_ARGS = ["-c", "512", "-b", "512", "-t", str(THREADS)]
CHUNKS = ["--chunks", "20"]
ATTEMPTS = 3  # llama.cpp's async logger sometimes drops the last lines of its output


# -- environment -----------------------------------------------------------------------------
def llama_cpp() -> tuple[Path, Path]:
    """(bin, src) of the llama.cpp build; the build script is a no-op when the tools exist."""
    out = subprocess.run(["bash", str(BUILD_LLAMA)], check=True, capture_output=True, text=True).stdout
    found = dict(line.split("=", 1) for line in out.strip().splitlines()[-2:])
    return Path(found["LLAMA_CPP_BIN"]), Path(found["LLAMA_CPP_SRC"])


def model_folder(name: str) -> Path:
    if name == "pycode-7m":
        return Path(default_model_path())
    if name == "llama-1.5g":
        from speed import model_folder as speed_model

        return Path(str(speed_model(name)))
    out = subprocess.run(["bash", str(SMOLLM2_BUILD)], check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def versions(bin_dir: Path) -> dict[str, Any]:
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "--version"], capture_output=True, text=True)
    llama = " ".join(line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip())
    pkgs = {p: metadata.version(p) for p in ("quantfoundry", "qf-gguf", "gguf", "torch", "safetensors",
                                              "transformers", "numpy")}
    return {"llama.cpp": llama, "python": platform.python_version(), **pkgs}


# -- helpers ---------------------------------------------------------------------------------
class Shorten:
    """Writes commands with $LLAMA_CPP_BIN / $LLAMA_CPP_SRC / $WORK / $SHARED for the JSON."""

    def __init__(self, pairs: dict[str, Path]) -> None:
        self.pairs = sorted(((str(p), k) for k, p in pairs.items()), key=lambda x: -len(x[0]))

    def __call__(self, argv: Sequence[str | Path]) -> str:
        s = shlex.join(str(a) for a in argv)
        for path, name in self.pairs:
            s = s.replace(path, name)
        return s


def run_cmd(argv: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {shlex.join(str(a) for a in argv)}\n{(r.stdout + r.stderr)[-3000:]}")
    return r


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(round(time.perf_counter() - t0, 3))
    return min(times), times


def parse_run(argv: Sequence[str | Path], patterns: dict[str, str]) -> dict[str, float]:
    """Run ``argv`` and parse one float per pattern from its output, retrying when a line is missing."""
    for _attempt in range(ATTEMPTS):
        r = run_cmd(argv)
        text = r.stdout + r.stderr
        found = {k: re.search(p, text) for k, p in patterns.items()}
        if all(found.values()):
            return {k: float(m.group(1)) for k, m in found.items() if m}
    sys.exit(f"no {[k for k, m in found.items() if not m]} in the output of {shlex.join(map(str, argv))}"
             f" after {ATTEMPTS} attempts:\n{text[-2000:]}")


PPL_LINE = {"ppl": r"Final estimate: PPL = ([0-9.]+)"}
KLD_LINES = {"kld_mean": r"Mean\s+KLD:\s+([-0-9.]+)", "same_top_p_pct": r"Same top p:\s+([0-9.]+)",
             "ppl_q_kld_run": r"Mean PPL\(Q\)\s+:\s+([0-9.]+)", "ppl_base_kld_run": r"Mean PPL\(base\)\s+:\s+([0-9.]+)"}


def tensors_of(path: Path) -> dict[str, tuple[str, bytes, int, int]]:
    """name -> (GGML type, raw bytes, n_elements, n_bytes)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, t.data.tobytes(), int(t.n_elements),
                     int(t.n_bytes)) for t in reader.tensors}


def digest(tensors: dict[str, tuple[str, bytes, int, int]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        typ, data, _, _ = tensors[name]
        h.update(f"{name}:{typ}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()[:16]


def bpw(tensors: dict[str, tuple[str, bytes, int, int]]) -> float:
    return 8 * sum(t[3] for t in tensors.values()) / sum(t[2] for t in tensors.values())


def compare(ours: dict[str, tuple[str, bytes, int, int]], theirs: dict[str, tuple[str, bytes, int, int]],
            block_bytes: Callable[[str], int]) -> dict[str, Any]:
    """Identical tensors, and for each differing one where it differs."""
    names = sorted(set(ours) | set(theirs))
    same, differing = 0, []
    for n in names:
        a, b = ours.get(n), theirs.get(n)
        if a is not None and b is not None and a[0] == b[0] and a[1] == b[1]:
            same += 1
            continue
        d: dict[str, Any] = {"tensor": n, "type_ours": a and a[0], "type_theirs": b and b[0]}
        if a is not None and b is not None and a[0] == b[0] and len(a[1]) == len(b[1]):
            x, y = np.frombuffer(a[1], np.uint8), np.frombuffer(b[1], np.uint8)
            bb = block_bytes(a[0])
            d |= {"bytes_differing": int((x != y).sum()), "bytes": len(a[1]),
                  "blocks_differing": int((x != y).reshape(-1, bb).any(1).sum()), "blocks": len(a[1]) // bb}
        differing.append(d)
    return {"identical": same, "total": len(names), "differing": differing}


def f16_rounding(folder: Path) -> dict[str, Any]:
    """How many of the checkpoint's weights change when rounded to F16 (what --outtype f16 does)."""
    changed, total, largest = 0, 0, 0.0
    for f in sorted(folder.glob("*.safetensors")):
        for v in load_file(str(f)).values():
            if v.is_floating_point():
                c = v.float() != v.to(torch.float16).float()
                changed, total = changed + int(c.sum()), total + v.numel()
                largest = max(largest, float(v.float()[c].abs().max()) if c.any() else 0.0)
    return {"weights_changed": changed, "weights": total, "largest_changed_magnitude": largest}


def block_bytes(type_name: str) -> int:
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return size


# -- the measurement -------------------------------------------------------------------------
class Bench:
    def __init__(self, model: str, work: Path, bin_dir: Path, src: Path, repeats: int) -> None:
        self.model, self.work, self.bin, self.src, self.repeats = model, work / model, bin_dir, src, repeats
        self.work.mkdir(parents=True, exist_ok=True)
        self.folder = model_folder(model)
        self.text = TEXT_OF[model]
        self.short = Shorten({"$LLAMA_CPP_BIN": bin_dir, "$LLAMA_CPP_SRC": src, "$WORK": work,
                              "$SHARED": SHARED.resolve(), "$MODEL": self.folder})
        self.base = self.work / "base-f16.gguf"
        self.imatrix = self.work / "imatrix.gguf"
        self.kld_base = self.work / "base.kld"
        self.scored: dict[str, dict[str, Any]] = {}  # tensor digest -> quality figures

    def ppl_cmd(self, file: Path) -> list[str | Path]:
        return [self.bin / "llama-perplexity", "-m", file, "-f", self.text, *PPL_ARGS, *CHUNKS]

    def kld_cmd(self, file: Path) -> list[str | Path]:
        return [self.bin / "llama-perplexity", "-m", file, "--kl-divergence-base", self.kld_base, "--kl-divergence",
                *PPL_ARGS]

    def prepare(self) -> dict[str, Any]:
        convert = [sys.executable, self.src / "convert_hf_to_gguf.py", self.folder, "--outtype", "f16",
                   "--outfile", self.base]
        t0 = time.perf_counter()
        run_cmd(convert)
        convert_s = round(time.perf_counter() - t0, 2)
        calib = self.work / "calib.txt"
        calib.write_text(self.text.read_text(encoding="utf-8")[:CALIB_CHARS], encoding="utf-8")
        # a random-weight model's imatrix only needs to exist (its values drive the encoders either way)
        imat_args = IMATRIX_ARGS if self.model not in NO_QUALITY else ["-c", "256", "--chunks", "4", "-t", str(THREADS)]
        imat = [self.bin / "llama-imatrix", "-m", self.base, "-f", calib, *imat_args, "-o", self.imatrix]
        t0 = time.perf_counter()
        run_cmd(imat)
        imatrix_s = round(time.perf_counter() - t0, 2)
        chunks = gguf.GGUFReader(str(self.imatrix)).fields["imatrix.chunk_count"].contents()
        base_t = tensors_of(self.base)
        info: dict[str, Any] = {
            "folder": str(self.folder), "text": self.short([self.text]), "convert_s": convert_s,
            "imatrix_s": imatrix_s, "imatrix_chunks": chunks, "calib_chars": CALIB_CHARS,
            "base_size_bytes": self.base.stat().st_size, "base_bpw": bpw(base_t),
            "commands": {"convert": self.short(convert), "imatrix": self.short(imat)}}
        if self.model not in NO_QUALITY:
            base_ppl = parse_run(self.ppl_cmd(self.base), PPL_LINE)["ppl"]
            kld_base = [self.bin / "llama-perplexity", "-m", self.base, "-f", self.text, *PPL_ARGS, *CHUNKS,
                        "--kl-divergence-base", self.kld_base]
            run_cmd(kld_base)
            info.update(base_ppl=base_ppl, f16_rounding=f16_rounding(self.folder))
            info["commands"].update(perplexity_base=self.short(self.ppl_cmd(self.base)), kld_base=self.short(kld_base))
        print(f"{self.model}: convert {convert_s} s, imatrix {imatrix_s} s ({chunks} chunks), "
              f"F16 PPL {info.get('base_ppl', '-')}", flush=True)
        return info

    def ours(self, folder: Path, ftype: str, imatrix: bool, out: Path) -> dict[str, float]:
        """One qf run; its phase timings (``encode``: the GGML encoders alone)."""
        opts: dict[str, Any] = {"type": ftype}
        if imatrix:
            opts["imatrix"] = str(self.imatrix)
        r = quantfoundry.run(str(folder), exporter="gguf", exporter_options=opts, evaluators=[], out=str(out),
                             overwrite=True, progress=False, threads=THREADS)
        self.last_timings = r.timings
        return r.timings

    def quality(self, file: Path, tensors: dict[str, tuple[str, bytes, int, int]], label: str) -> dict[str, Any]:
        if self.model in NO_QUALITY:
            return {}
        key = digest(tensors)
        if key in self.scored:
            return {**self.scored[key], "quality_shared_with": self.scored[key]["scored_file"]}
        q: dict[str, Any] = {"tensor_digest": key, "scored_file": label, **parse_run(self.ppl_cmd(file), PPL_LINE),
                             **parse_run(self.kld_cmd(file), KLD_LINES)}
        self.scored[key] = q
        return q

    def row(self, ftype: str, imatrix: bool) -> dict[str, Any]:
        tag = f"{ftype}{'-imatrix' if imatrix else ''}"
        theirs_file = self.work / f"theirs-{tag}.gguf"
        out = self.work / f"ours-{tag}"
        quant = [self.bin / "llama-quantize", *(["--imatrix", self.imatrix] if imatrix else []), self.base,
                 theirs_file, ftype, str(THREADS)]
        load_before = load1()
        t_theirs, all_theirs = best_time(lambda: run_cmd(quant), self.repeats)
        runs: list[dict[str, float]] = []
        t_ours, all_ours = best_time(lambda: runs.append(self.ours(self.folder, ftype, imatrix, out)), self.repeats)
        timings = runs[all_ours.index(t_ours)]
        ours_file = out / "model.gguf"
        qf_opts = {"type": ftype, **({"imatrix": f"$WORK/{self.model}/imatrix.gguf"} if imatrix else {})}
        a, b = tensors_of(ours_file), tensors_of(theirs_file)
        cmp = compare(a, b, block_bytes)
        identical = cmp["identical"] == cmp["total"]
        q_theirs = self.quality(theirs_file, b, f"theirs {tag}")
        q_ours = q_theirs if identical else self.quality(ours_file, a, f"ours {tag}")
        r = {"model": self.model, "type": ftype, "imatrix": imatrix, "load1_before_timing": load_before,
             "tensors_identical": cmp["identical"], "tensors_total": cmp["total"], "differing": cmp["differing"],
             "size_bytes_ours": ours_file.stat().st_size, "size_bytes_theirs": theirs_file.stat().st_size,
             "bpw_ours": bpw(a), "bpw_theirs": bpw(b),
             "time_ours_s": t_ours, "time_ours_all_s": all_ours, "timings_ours": timings,
             "encode_ours_s": round(timings.get("encode", 0.0), 3),
             "time_llama_quantize_s": t_theirs, "time_llama_quantize_all_s": all_theirs,
             "quality_ours": q_ours, "quality_theirs": q_theirs, "quality_scored_once": identical,
             "commands": {"llama_quantize": self.short(quant),
                          "qf": f"quantfoundry.run('$MODEL', exporter='gguf', exporter_options={qf_opts!r}, "
                                "evaluators=[], out=..., overwrite=True, progress=False)",
                          "perplexity": self.short(self.ppl_cmd(theirs_file)),
                          "kld": self.short(self.kld_cmd(theirs_file))}}
        print(f"{self.model} {tag}: identical {cmp['identical']}/{cmp['total']}, ours {t_ours:.2f} s "
              f"(encode {r['encode_ours_s']:.2f} s), llama-quantize {t_theirs:.2f} s, PPL {q_ours.get('ppl')} / "
              f"{q_theirs.get('ppl')}, KLD {q_ours.get('kld_mean')} / {q_theirs.get('kld_mean')}", flush=True)
        return r

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """GGUF name -> the checkpoint's weight in GGUF row order (q/k rows permuted as llama.cpp does)."""
        cfg = json.loads((self.folder / "config.json").read_text())
        heads = {"attn_q": cfg["num_attention_heads"],
                 "attn_k": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
        out = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            for k, v in load_file(str(f)).items():
                name = gguf_name(k)
                if name is None:
                    continue
                kind = name.split(".")[-2]
                out[name] = v[permute_rows(v.shape[0], heads[kind])] if kind in heads else v
        return out

    def f16_check(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Where tensors differ: do the differing blocks hold weights that F16 rounding changes, and does qf,
        given an F16-rounded copy of the checkpoint, write llama-quantize's bytes?"""
        weights = self.hf_weights()
        changed = {n: (w.float() != w.to(torch.float16).float()) for n, w in weights.items()}
        copy = self.work / "f16-copy"
        copy.mkdir(exist_ok=True)
        for f in self.folder.iterdir():
            if f.name.endswith(".safetensors"):
                sd = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(f)).items()}
                save_file(sd, str(copy / f.name), metadata={"format": "pt"})
            elif f.is_file():
                shutil.copy2(f, copy / f.name)
        out: dict[str, Any] = {
            "weights_changed_by_f16_rounding": int(sum(int(c.sum()) for c in changed.values())),
            "weights": int(sum(c.numel() for c in changed.values())),
            "largest_changed_magnitude": max((float(w.float()[c].abs().max()) for n, w in weights.items()
                                              if (c := changed[n]).any()), default=0.0),
            "rows": {}}
        for r in rows:
            if r["tensors_identical"] == r["tensors_total"]:
                continue
            tag = f"{r['type']}{'-imatrix' if r['imatrix'] else ''}"
            theirs = tensors_of(self.work / f"theirs-{tag}.gguf")
            ours = tensors_of(self.work / f"ours-{tag}" / "model.gguf")
            blocks = []
            for d in r["differing"]:
                n, typ = d["tensor"], d["type_ours"]
                if n not in changed or typ != d["type_theirs"]:
                    continue
                per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[typ]][0]
                ch = changed[n].reshape(-1, per_block).sum(1)
                x = np.frombuffer(ours[n][1], np.uint8).reshape(-1, block_bytes(typ))
                y = np.frombuffer(theirs[n][1], np.uint8).reshape(-1, block_bytes(typ))
                diff = np.nonzero((x != y).any(1))[0]
                blocks.append({"tensor": n, "differing_blocks": [int(i) for i in diff],
                               "f16_changed_weights_in_differing_blocks": [int(ch[i]) for i in diff],
                               "blocks_with_f16_changed_weights": int((ch > 0).sum()), "blocks": int(ch.numel())})
            dest = self.work / f"ours-f16copy-{tag}"
            self.ours(copy, r["type"], r["imatrix"], dest)
            cmp = compare(tensors_of(dest / "model.gguf"), theirs, block_bytes)
            out["rows"][tag] = {"identical_from_f16_copy": cmp["identical"], "total": cmp["total"],
                                "still_differing": [d["tensor"] for d in cmp["differing"]], "blocks": blocks}
            print(f"{self.model} {tag}: differing blocks {blocks}; from the F16-rounded copy: identical "
                  f"{cmp['identical']}/{cmp['total']}", flush=True)
        return out


# -- the table -------------------------------------------------------------------------------
def pair(a: float, b: float, fmt: str) -> str:
    sa, sb = format(a, fmt), format(b, fmt)
    return sa if sa == sb else f"{sa} / {sb}"


def render(data: dict[str, Any]) -> str:
    out = ["| model | type | imatrix | identical tensors | size MiB ours / theirs | bpw | PPL ours / theirs | "
           "mean KLD | same top p % | qf run s | qf encode s | llama-quantize s | encode ratio | "
           "convert + quantize s |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        info = data["models"].get(model)
        if info is None:
            continue
        ppl = f"{info['base_ppl']:.4f}" if "base_ppl" in info else "—"
        out.append(f"| {model} | F16 (convert) | — | — | {info['base_size_bytes'] / 2**20:.2f} | "
                   f"{info['base_bpw']:.3f} | {ppl} | 0 | 100 | — | — | — | — | {info['convert_s']:.2f} (convert) |")
        for ftype in ALL_TYPES:
            for im in (False, True):
                r = data["rows"].get(f"{model}/{ftype}/{'imatrix' if im else 'plain'}")
                if r is None:
                    continue
                qo, qt = r["quality_ours"], r["quality_theirs"]
                if qt:
                    quality = (f"{pair(qo['ppl'], qt['ppl'], '.4f')} | {pair(qo['kld_mean'], qt['kld_mean'], '.6f')} | "
                               f"{pair(qo['same_top_p_pct'], qt['same_top_p_pct'], '.3f')}")
                else:
                    quality = "— | — | —"
                enc = r.get("encode_ours_s")
                enc_s = f"{enc:.2f}" if enc is not None else "—"
                ratio = f"{enc / r['time_llama_quantize_s']:.2f}×" if enc is not None else "—"
                both = info["convert_s"] + r["time_llama_quantize_s"]
                out.append(
                    f"| {model} | {ftype} | {'yes' if im else 'no'} | {r['tensors_identical']}/{r['tensors_total']} | "
                    f"{r['size_bytes_ours'] / 2**20:.3f} / {r['size_bytes_theirs'] / 2**20:.3f} | "
                    f"{pair(r['bpw_ours'], r['bpw_theirs'], '.3f')} | {quality} | {r['time_ours_s']:.2f} | {enc_s} | "
                    f"{r['time_llama_quantize_s']:.2f} | {ratio} | {both:.2f} |")
    return "\n".join(out) + "\n"


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    ap.add_argument("--types", nargs="*", choices=ALL_TYPES,
                    help="file types for every model (default: all seven for pycode-7m, "
                         + " ".join(DEFAULT_TYPES["smollm2-135m"]) + " for SmolLM2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per file, the fastest is kept")
    ap.add_argument("--threads", type=int, default=THREADS, help="threads of llama-quantize and of qf (--threads)")
    ap.add_argument("--workdir", type=Path, help="keep the GGUF files here (default: a temporary folder)")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    THREADS = a.threads
    data: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data.setdefault("models", {})
    data.setdefault("rows", {})
    if not a.table_only:
        t_start = time.perf_counter()
        bin_dir, src = llama_cpp()
        meta = {"cpu": cpu_name(), "threads": THREADS, "torch_threads": torch.get_num_threads(),
                "os_cpu_count": os.cpu_count(), "load1_at_start": load1(), **core_version(),
                "versions": versions(bin_dir), "repeats": a.repeats}
        data["last_run"] = {**meta, "models": a.models, "types": a.types or DEFAULT_TYPES}
        tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="qf-gguf-bench-")
        work = a.workdir or Path(tmp.name if tmp else ".")
        try:
            for model in a.models:
                bench = Bench(model, work.resolve(), bin_dir, src, a.repeats)
                data["models"][model] = {**bench.prepare(), "measured_with": meta}
                rows = []
                for ftype in a.types or DEFAULT_TYPES[model]:
                    for im in (False, True):
                        rows.append(bench.row(ftype, im))
                        data["rows"][f"{model}/{ftype}/{'imatrix' if im else 'plain'}"] = rows[-1]
                        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
                if any(r["tensors_identical"] != r["tensors_total"] for r in rows):
                    data["models"][model]["f16_check"] = bench.f16_check(rows)
                RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        finally:
            if tmp is not None:
                tmp.cleanup()
        data["last_run"]["wall_s"] = round(time.perf_counter() - t_start, 1)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(f"total {data['last_run']['wall_s']} s")
    table = render(data)
    TABLE.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
