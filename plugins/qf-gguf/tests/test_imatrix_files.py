"""imatrix files: ours read what llama-imatrix writes, and llama-quantize accepts what we write."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from qf_gguf.imatrix import Imatrix, read_imatrix, write_imatrix
from quantfoundry.data import default_eval_text, default_model_path
from quantfoundry.errors import ArtifactError


@pytest.fixture(scope="module")
def llama_files(llama_cpp, tmp_path_factory):
    """pycode-7m as an F32 GGUF (llama.cpp's converter) and llama-imatrix's output in both formats."""
    d = tmp_path_factory.mktemp("imatrix")
    f32 = d / "pycode-7m-f32.gguf"
    r = subprocess.run([sys.executable, str(llama_cpp["src"] / "convert_hf_to_gguf.py"), str(default_model_path()),
                        "--outtype", "f32", "--outfile", str(f32)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    text = d / "calib.txt"
    text.write_text(default_eval_text().read_text()[:40_000])
    out = {}
    for fmt in ("gguf", "dat"):
        out[fmt] = d / f"llama.{fmt}"
        r = subprocess.run([str(llama_cpp["bin"] / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-c", "128",
                            "--chunks", "12", "-t", "2", "-o", str(out[fmt]), "--output-format", fmt],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    return {"f32": f32, **out, "dir": d}


def quantize_with(llama_cpp, files, imatrix_path, name: str) -> dict[str, np.ndarray]:
    out = files["dir"] / f"{name}.gguf"
    r = subprocess.run([str(llama_cpp["bin"] / "llama-quantize"), "--imatrix", str(imatrix_path), str(files["f32"]),
                        str(out), "Q4_K_M", "2"], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    return {t.name: np.asarray(t.data).copy() for t in GGUFReader(str(out)).tensors}


def test_reads_both_llama_imatrix_formats(llama_files) -> None:
    g, d = read_imatrix(llama_files["gguf"]), read_imatrix(llama_files["dat"])
    assert set(g.entries) == set(d.entries) and "blk.0.attn_q.weight" in g.entries and len(g.entries) == 42
    assert g.chunk_count == d.chunk_count == 12 and g.chunk_size == 128
    for name in g.entries:
        a, b = g.importance(name), d.importance(name)
        assert a.shape == b.shape and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)  # the .dat stores mean × ncall


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_accepts_what_we_write(llama_cpp, llama_files, fmt: str) -> None:
    ours = write_imatrix(read_imatrix(llama_files["gguf"]), llama_files["dir"] / f"ours.{fmt}", fmt=fmt)
    want = quantize_with(llama_cpp, llama_files, llama_files["gguf"], "with-llama")
    got = quantize_with(llama_cpp, llama_files, ours, f"with-ours-{fmt}")
    assert want.keys() == got.keys()
    for name in want:  # the same imatrix drives llama-quantize to the same bytes
        assert np.array_equal(want[name], got[name]), name
    plain = subprocess.run([str(llama_cpp["bin"] / "llama-quantize"), str(llama_files["f32"]),
                            str(llama_files["dir"] / "plain.gguf"), "Q4_K_M", "2"], capture_output=True)
    assert plain.returncode == 0
    plain_t = {t.name: np.asarray(t.data) for t in GGUFReader(str(llama_files["dir"] / "plain.gguf")).tensors}
    assert not np.array_equal(plain_t["blk.0.attn_q.weight"], got["blk.0.attn_q.weight"])  # it was used


def test_from_means_round_trip(tmp_path) -> None:
    means = {"blk.0.attn_q.weight": torch.rand(256) * 3, "blk.0.ffn_down.weight": torch.rand(512)}
    im = Imatrix.from_means(means, tokens=1000, dataset="calib.txt", chunk_size=512, chunk_count=2)
    for fmt in ("gguf", "dat"):
        back = read_imatrix(write_imatrix(im, tmp_path / f"x.{fmt}", fmt=fmt))
        assert back.datasets == ["calib.txt"] and back.chunk_count == 2
        for name, m in means.items():
            torch.testing.assert_close(back.importance(name), m, rtol=1e-6, atol=0)


def test_damaged_files_are_one_line_errors(tmp_path, llama_files) -> None:
    cut = tmp_path / "cut.dat"
    cut.write_bytes(llama_files["dat"].read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="truncated"):
        read_imatrix(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ArtifactError, match="not a readable llama.cpp imatrix"):
        read_imatrix(junk)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")
