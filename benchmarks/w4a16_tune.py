"""Issue 20: tune the GEMV tiles of ``triton-w4a16`` on this GPU and write them to the plugin's
``tuned.json``, so a user's first call runs tuned tiles without waiting for an autotuner.

For each GEMV (``fma``: 1-4 rows on CUDA cores; ``h2``: one row, paired 16-bit instructions;
``dot``/``dot_t``: up to 16 rows on tensor cores), row
bucket (1, 2, 4, 8, 16), 4-bit int4-g128 weight of the Llama-3 linear shapes (and a 1B one), and
candidate tile (``bn``, ``bk``, warps, pipeline stages, split of the input dimension), the call
is checked against the float product and timed (median of CUDA-event timings of replays of a
CUDA graph of 10 calls). The kernels are compiled first, in parallel worker processes that
fill Triton's on-disk cache. Each shape class (``qf_triton.configs.shape_class`` of the output
and input features) keeps the tile with the smallest sum over its shapes of time / that shape's
best time; every timing goes to ``--out``.

    python benchmarks/w4a16_tune.py --out benchmarks/results/cuda/w4a16_tune_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SHAPES = {
    "1B q/o 2048x2048": (2048, 2048), "8B q/o 4096x4096": (4096, 4096), "8B kv 1024x4096": (1024, 4096),
    "8B gate_up 28672x4096": (28672, 4096), "8B down 4096x14336": (4096, 14336), "70B q/o 8192x8192": (8192, 8192),
    "70B gate_up 57344x8192": (57344, 8192), "70B down 8192x28672": (8192, 28672),
}
ROWS = {"fma": (1, 4), "h2": (1,), "dot": (1, 4, 16), "dot_t": (1, 4, 16)}


def candidates(kind: str) -> list[dict]:
    if kind == "fma":
        grid = itertools.product((64, 128, 256), (32, 64, 128), (2, 4), (1, 2, 3))
    elif kind == "h2":  # one row; a tile stays inside one 256-column block of the packed words
        return [{"bn": bn, "bk": 128, "warps": w, "stages": 1, "chain": ch, "prefetch": pf}
                for bn, w, ch, pf in itertools.product((64, 128, 256), (2, 4, 8), (1, 2), (False, True))]
    else:  # dot_t: the weight as the first operand, 64-row multiples for Hopper's warpgroup MMA
        grid = itertools.product((64, 128, 256), (128,), (4, 8), (2, 3, 4))
    return [{"bn": bn, "bk": bk, "warps": w, "stages": st} for bn, bk, w, st in grid]


def problem(n: int, k: int, m: int, dev: torch.device, seed: int = 0):
    from qf_triton.wa16 import repack

    g = torch.Generator(dev).manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8, device=dev)
    scale = (torch.rand(n, k // 128, generator=g, device=dev) * 0.01 + 1e-3).half()
    zero = torch.randint(0, 16, (n, k // 128), generator=g, dtype=torch.uint8, device=dev)
    p = repack(codes, scale, zero, 4, 128)
    w = ((codes.float().view(n, -1, 128) - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)
    x = torch.randn(m, k, generator=g, device=dev).half()
    return p, w, x


def _compile(job: tuple[str, dict, int]) -> str | None:
    from qf_triton.gemv import gemv

    kind, c, m = job
    p, _, x = problem(256, 1024, m, torch.device("cuda"))
    try:
        for split in (1, 2):
            gemv(x, p, None, config(kind, c, split))
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - a config Triton cannot build is reported and skipped
        return f"{kind} {c}: {type(e).__name__}: {str(e)[:160]}"


def config(kind: str, c: dict, split: int):
    from qf_triton.gemv import GemvConfig

    return GemvConfig(kind, c["bn"], c["bk"], split, c["warps"], c["stages"], c.get("chain", 1),
                      c.get("prefetch", False))


TILE = ("bn", "bk", "warps", "stages", "chain", "prefetch")


def timed(fn) -> float:
    """Median µs per call over 5 replays of a CUDA graph of 10 calls (``w8a8_speed.timed``)."""
    from w8a8_speed import timed as timed_ms

    return 1e3 * timed_ms(lambda _: fn(), None, reps=5, inner=10)


def _timings(row: dict[str, float], kind: str) -> dict[tuple, tuple[float, int]]:
    """A shape's timings of ``kind``: per tile (bn, bk, warps, stages), its best µs over the
    splits tried and that split."""
    best: dict[tuple, tuple[float, int]] = {}
    for key, us in row.items():
        if not key.startswith("{"):
            continue
        c = json.loads(key)
        if c["kind"] != kind:
            continue
        tile = tuple(c.get(f) for f in TILE)
        if tile not in best or us < best[tile][0]:
            best[tile] = (us, c["split"])
    return best


def write_table(results: dict[str, dict[str, float]], name: str, path: Path | None, sms: int) -> dict[str, dict]:
    """Per tuned bucket and shape class, the tile (each shape at its best split) with the
    smallest mean of time / best time over the class's shapes, into the device's section of
    ``tuned.json``. The split is kept as ``waves``, programs per SM (the geometric mean over the
    class's shapes of output tiles × best split / SMs): :func:`qf_triton.configs.split_for`
    turns it back into a split for any shape. Each measured shape also gets its own best tile
    and split (``kind|rows|NxK|4``), which the dispatch prefers for that exact shape."""
    from qf_triton.configs import TUNED, rows_bucket, shape_class

    table_path = path or TUNED
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    entries: dict[str, dict] = {}
    classes: dict[str, list[tuple[int, float, dict[tuple, tuple[float, int]]]]] = {}
    for key, row in results.items():
        label, m = key.split("|")
        n, k = SHAPES[label]
        for kind in ROWS:
            timings = _timings(row, kind)
            if timings:
                classes.setdefault(f"{kind}|{rows_bucket(int(m))}|{shape_class(n)}|{shape_class(k)}|4", []).append(
                    (n, row["cublas_fp16_us"], timings))
    for ckey, rows in classes.items():
        seen = set.union(*(set(t) for _, _, t in rows))  # a tile a shape could not run counts as 3x its best
        best = [min(us for us, _ in t.values()) for _, _, t in rows]
        score = {c: sum(t[c][0] / b if c in t else 3.0 for (_, _, t), b in zip(rows, best)) / len(rows) for c in seen}
        chosen = min(score, key=score.get)
        tile = {f: v for f, v in zip(TILE, chosen) if v is not None}
        bn = tile["bn"]
        ran = [(n, cublas, t[chosen]) for n, cublas, t in rows if chosen in t]
        waves = math.exp(sum(math.log(-(-n // bn) * split / sms) for n, _, (_, split) in ran) / len(ran))
        speedup = sum(cublas / us for _, cublas, (us, _) in ran) / len(rows)
        entries[ckey] = {**tile, "waves": round(waves, 3),
                         "mean_over_best": round(score[chosen], 3), "vs_cublas": round(speedup, 3), "shapes": len(rows)}
    for key, row in results.items():  # and each measured shape's own best tile and split
        label, m = key.split("|")
        n, k = SHAPES[label]
        for kind in ROWS:
            if timings := _timings(row, kind):
                tile, (us, split) = min(timings.items(), key=lambda kv: kv[1][0])
                entries[f"{kind}|{rows_bucket(int(m))}|{n}x{k}|4"] = {
                    **{f: v for f, v in zip(TILE, tile) if v is not None}, "split": split,
                    "vs_cublas": round(row["cublas_fp16_us"] / us, 3)}
    table[name] = dict(sorted({**table.get(name, {}), **entries}.items()))  # entries this run measured replace theirs
    table_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return entries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, default=None, help="the tuned.json to update (default: the plugin's)")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--rows", nargs="+", type=int, default=None, help="only these row counts (default: each kind's)")
    ap.add_argument("--from-results", type=Path, default=None,
                    help="rewrite the table from an earlier run's --out file (no GPU needed); with --sms")
    ap.add_argument("--sms", type=int, default=132, help="with --from-results: the device's SM count")
    args = ap.parse_args()
    if args.from_results:
        done = json.loads(args.from_results.read_text())
        entries = write_table(done["rows"], done["device"], args.table, args.sms)
        print(f"wrote {len(entries)} entries for {done['device']}")
        return
    from qf_triton.gemv import gemv

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    t0 = time.time()
    kinds = {k: tuple(m for m in ROWS[k] if args.rows is None or m in args.rows) for k in args.kinds}
    jobs = [(kind, c, m) for kind in kinds for c in candidates(kind) for m in (ROWS[kind][:1] if kind.startswith("dot") else ROWS[kind])]
    with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as ex:
        failed = {e.split(":")[0] for e in ex.map(_compile, jobs) if e}
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f} s; {len(failed)} failed: {sorted(failed)[:4]}",
          flush=True)
    results: dict[str, dict[str, float]] = {}
    for label in args.shapes:
        n, k = SHAPES[label]
        p, w, _ = problem(n, k, 1, dev)
        wh = w.half()
        for kind, ms in kinds.items():
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                ref = x.float() @ w.T
                key = f"{label}|{m}"
                row = results.setdefault(key, {"cublas_fp16_us": timed(lambda x=x, wh=wh: torch.nn.functional.linear(x, wh))})
                for c in candidates(kind):
                    if f"{kind} {c}" in failed:
                        continue
                    for split in (1, 2, 4, 8, 16):
                        progs = -(-n // c["bn"]) * split
                        if k % (split * c["bk"]) or progs > 16 * sms or (split > 1 and progs > 6 * sms):
                            continue
                        cfg = config(kind, c, split)
                        y = gemv(x, p, None, cfg)
                        err = float((y.float() - ref).abs().max() / ref.abs().max())
                        if not err < 1e-2:
                            print(f"WRONG {key} {cfg}: {err:.2e}", flush=True)
                            continue
                        row[json.dumps({"kind": kind, **c, "split": split})] = timed(lambda x=x, p=p, cfg=cfg: gemv(x, p, None, cfg))
                best = min((us, (kind, *tile, split)) for tile, (us, split) in _timings(row, kind).items())
                print(f"{key:>28} {kind}: cuBLAS {row['cublas_fp16_us']:6.1f} us, best {best[0]:6.1f} us "
                      f"({row['cublas_fp16_us'] / best[0]:.2f}x) {best[1]}", flush=True)
        del p, w, wh
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": results}, indent=1))
        entries = write_table(results, name, args.table, sms)  # after every shape: a cut run keeps what it measured
    print(f"wrote {len(entries)} entries for {name} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
