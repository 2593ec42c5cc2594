"""File types (Q4_K_M …): our per-tensor types against the types ``llama-quantize`` writes.

A config-built Llama with 32 layers (so the layer-position rules bite), GQA 4, and an FFN width
of 320 (not a multiple of 256, so ffn_down falls back) is converted to F32 GGUF by llama.cpp's
own converter and quantized by ``llama-quantize`` to every file type; the tensor types in its
output must equal :func:`choose_types` on the same tensor list. The same for a 16-layer Mixtral
of 8 experts (stacked expert tensors, the router, the expert-count rules).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from qf_gguf.imatrix import Imatrix, write_imatrix
from qf_gguf.mixes import FILE_TYPES, MixContext, choose_types
from quantfoundry.testing.tiny import build_tiny_model

SHAPE = {"hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 32, "num_attention_heads": 8,
         "num_key_value_heads": 2}


def f32_gguf(llama_cpp, folder, out):
    r = subprocess.run([sys.executable, str(llama_cpp["src"] / "convert_hf_to_gguf.py"), str(folder), "--outtype",
                        "f32", "--outfile", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, llama_cpp, tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    folder = build_tiny_model(d / "hf", "llama", tie_word_embeddings=request.param, **SHAPE)
    gguf = f32_gguf(llama_cpp, folder, d / "f32.gguf")
    reader = GGUFReader(str(gguf))
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    ctx = MixContext(n_layer=32, n_head=8, n_head_kv=2)
    return {"gguf": gguf, "tensors": tensors, "ctx": ctx, "dir": d}


def llama_types(llama_cpp, model, ftype: str, *extra: str) -> dict[str, str]:
    out = model["dir"] / f"{ftype}-{len(extra)}.gguf"
    r = subprocess.run([str(llama_cpp["bin"] / "llama-quantize"), *extra, str(model["gguf"]), str(out), ftype, "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    return {t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(str(out)).tensors}


def ours(model, ftype: str, ctx: MixContext | None = None) -> dict[str, str]:
    types = choose_types(ftype, model["tensors"], ctx or model["ctx"])
    return {n: (t if t is not None else "F32") for n, t in types.items()}


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_types_equal_llama_quantize(llama_cpp, model, ftype: str) -> None:
    want = llama_types(llama_cpp, model, ftype)
    got = ours(model, ftype)
    assert got == want, {n: (got[n], want[n]) for n in want if got.get(n) != want[n]}
    assert len(set(got.values())) > 1  # the mix really mixes (fallbacks, Q6_K output, bumps)


def test_tensor_type_override_and_imatrix_rule(llama_cpp, model) -> None:
    override = [("attn_q", "Q8_0"), ("blk\\.3\\.", "Q5_K")]
    want = llama_types(llama_cpp, model, "Q4_K_M", "--tensor-type", "attn_q=q8_0", "--tensor-type", "blk\\.3\\.=q5_k")
    ctx = MixContext(n_layer=32, n_head=8, n_head_kv=2, overrides=override)
    assert ours(model, "Q4_K_M", ctx) == want
    # Q4_0 + imatrix: the first n/8 ffn_down become Q4_1
    means = {n: torch.ones(shape[0]) for n, shape in model["tensors"].items() if n.startswith("blk.") and len(shape) == 2}
    im = write_imatrix(Imatrix.from_means(means, tokens=100, dataset="x", chunk_size=100, chunk_count=1),
                       model["dir"] / "ones.gguf")
    want = llama_types(llama_cpp, model, "Q4_0", "--imatrix", str(im))
    ctx = MixContext(n_layer=32, n_head=8, n_head_kv=2, has_imatrix=True)
    got = ours(model, "Q4_0", ctx)
    assert got == want and list(got.values()).count("Q4_1") == 4


@pytest.fixture(scope="module")
def mixtral(llama_cpp, tmp_path_factory):
    """Mixtral's shape in small: 16 layers of 8 experts (llama-quantize's 8-expert rules), GQA 2."""
    d = tmp_path_factory.mktemp("moe-mix")
    folder = build_tiny_model(d / "hf", "mixtral", hidden_size=256, intermediate_size=256, num_hidden_layers=16,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8)
    gguf = f32_gguf(llama_cpp, folder, d / "f32.gguf")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in GGUFReader(str(gguf)).tensors}
    return {"gguf": gguf, "tensors": tensors, "ctx": MixContext(n_layer=16, n_head=4, n_head_kv=2, n_expert=8),
            "dir": d}


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_moe_types_equal_llama_quantize(llama_cpp, mixtral, ftype: str) -> None:
    """Stacked experts (3-D ``ffn_*_exps``), the F32 router, ffn_down by the layer in its name,
    and the 8-expert attn_v/attn_k/attn_output rules, for every file type."""
    want = llama_types(llama_cpp, mixtral, ftype)
    got = ours(mixtral, ftype)
    assert got == want, {n: (got[n], want[n]) for n in want if got.get(n) != want[n]}
    assert got["blk.0.ffn_gate_inp.weight"] == "F32" and got["blk.0.attn_v.weight"] == "Q8_0"
