"""The GGML formats against independent encoders and a decoder:

* llama.cpp's own ``ggml_quantize_chunk`` (``libggml-base.so`` built from the vendored source),
  every type;
* gguf-py's NumPy ports of the legacy ``_ref`` encoders (``gguf.quants.quantize``; gguf-py has
  no K-quant encoder);
* gguf-py's dequantizers, every type (our bytes → their floats == our decode, exactly).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import quantfoundry as qf
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from qf_gguf.kquants import KQUANT_FORMATS
from qf_gguf.legacy import LEGACY_FORMATS
from quantfoundry.data import default_model_path
from safetensors.torch import load_file

LEGACY = [cls.ggml_name for cls in LEGACY_FORMATS]
TYPES = LEGACY + [cls.ggml_name for cls in KQUANT_FORMATS]


def weights(seed: int = 0) -> torch.Tensor:
    """Rows that probe every branch: heavy tails, zeros, ±a ties, constants, tiny and huge values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 512, generator=g) * 0.02
    w[1:8] = torch.distributions.StudentT(2.0).sample((7, 512)) * 0.01  # heavy tails
    w[8] = 0.0                                                        # all-zero blocks (d = -0.0 for Q4_0)
    w[9, :32] = 0.5
    w[9, 32:64] = -0.5                                                # constant blocks, both signs
    w[9, 256:] = 0.25                                                 # a constant super-block
    w[10] = torch.where(torch.arange(512) % 2 == 0, 1.0, -1.0) * 0.03  # +a and -a tie: the first one wins
    w[11] = torch.randn(512, generator=g) * 1e-6                       # tiny (fp16 subnormal scales)
    w[12] = torch.randn(512, generator=g) * 30.0                       # large
    w[13, ::32] = 1.0                                                  # one spike per block
    w[14] = (torch.arange(512) % 16 - 7.5) * 0.01                      # values on the grid's half steps
    w[15, :16] = 0.0                                                   # one all-zero sub-block
    w[16] = w[16].abs()                                                # all positive (min clamped to 0)
    w[17, 32:64] = 0.0
    w[17, 64:96] *= 1e-4                                               # sub-block scales that quantize to 0
    return w


def ggml_library(llama_cpp) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(llama_cpp["bin"] / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def llama_cpp_bytes(lib: ctypes.CDLL, ggml_type: int, w: torch.Tensor, row_bytes: int) -> np.ndarray:
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    dst = np.zeros((src.shape[0], row_bytes), dtype=np.uint8)
    n = lib.ggml_quantize_chunk(ggml_type, src.ctypes.data, dst.ctypes.data, 0, src.shape[0], src.shape[1], None)
    assert n == dst.size
    return dst


def ours(spec: str, w: torch.Tensor):
    fmt = qf.resolve_format(spec)
    qw = fmt.quantize(w)
    return fmt, qw, fmt.ggml_bytes(qw).numpy()


@pytest.mark.parametrize("spec", TYPES)
def test_bytes_equal_gguf_py_and_dequantize_matches(spec: str) -> None:
    w = weights()
    fmt, qw, raw = ours(spec, w)
    qtype = GGMLQuantizationType[spec]
    if spec in LEGACY:  # gguf-py has no K-quant encoder
        want = gguf_quantize(w.numpy(), qtype)
        assert raw.shape == want.shape
        np.testing.assert_array_equal(raw, want)
    deq = gguf_dequantize(raw, qtype)
    np.testing.assert_array_equal(qw.dequantize().numpy(), deq)


@pytest.mark.parametrize("spec", TYPES)
def test_bytes_equal_llama_cpp_on_random_and_real_weights(spec: str, llama_cpp) -> None:
    lib = ggml_library(llama_cpp)
    fmt = qf.resolve_format(spec)
    tensors = load_file(str(default_model_path() / "model.safetensors"))
    real = [v.float() for k, v in sorted(tensors.items()) if v.ndim == 2 and ("layers.0." in k or "layers.3." in k)]
    for w in [weights(0), weights(1), *real]:
        _, qw, raw = ours(spec, w)
        want = llama_cpp_bytes(lib, fmt.ggml_type, w, raw.shape[1])
        same = (raw.reshape(-1, fmt.block_bytes) == want.reshape(-1, fmt.block_bytes)).all(-1)
        assert same.all(), f"{(~same).sum()} of {same.size} blocks differ"


@pytest.mark.parametrize("spec", TYPES)
def test_round_trip_through_ggml_bytes_and_column_slices(spec: str) -> None:
    w = weights(2)
    fmt, qw, raw = ours(spec, w)
    assert not any(k.startswith("_") for k in qw.params)  # transient float32 scales are not stored
    back = fmt.from_ggml_bytes(torch.from_numpy(raw), qw.shape)
    assert torch.equal(back.packed, qw.packed)
    for k in qw.params:
        assert torch.equal(back.params[k].view(torch.int16), qw.params[k].view(torch.int16))
    assert qw.nbytes() == raw.size == fmt.nbytes(qw.shape)
    # a column-by-column algorithm (GPTQ) rounds slices with col0 offsets: same codes
    params = fmt.fit(w)
    full = fmt.round(w, params)
    parts = torch.cat([fmt.round(w[:, c:c + 48], params, col0=c) for c in range(0, 512, 48)], dim=1)
    assert torch.equal(full, parts)
    assert torch.equal(fmt.decode(full[:, 40:100], params, col0=40), fmt.decode(full, params)[:, 40:100])


@pytest.mark.parametrize(("spec", "bpw"), [("Q4_0", 4.5), ("Q4_K", 4.5), ("Q6_K", 6.5625)])
def test_rtn_run_and_reload_with_a_ggml_format(spec: str, bpw: float, tmp_path) -> None:
    out = tmp_path / spec
    r = qf.run(format=spec, out=out, evaluators=[("perplexity", {"max_tokens": 3000}), ("size", {})],
               progress=False)
    assert r.metrics["size"]["linear_bpw"]["quantized"] == bpw
    assert r.manifest["evaluation"]["artifact_check"]["ok"]
    ppl = r.metrics["perplexity"]["perplexity"]
    assert ppl["original"] < ppl["quantized"] < ppl["original"] * 1.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")
@pytest.mark.parametrize("spec", TYPES)
def test_cuda_bytes_equal_cpu(spec: str) -> None:
    w = weights(3)
    fmt, _, raw = ours(spec, w)
    qw = fmt.quantize(w.cuda())
    assert qw.packed.is_cuda
    np.testing.assert_array_equal(fmt.ggml_bytes(qw).cpu().numpy(), raw)


def importance(cols: int, seed: int) -> torch.Tensor:
    """An imatrix row: mean squared activations, spread over orders of magnitude, some zeros."""
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(cols, generator=g) ** 4 * 10 + 1e-3
    imp[::97] = 0.0
    return imp


def llama_cpp_bytes_with_imatrix(lib, ggml_type: int, w: torch.Tensor, row_bytes: int, imp: torch.Tensor) -> np.ndarray:
    src = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    qw = np.ascontiguousarray(imp.numpy(), dtype=np.float32)
    dst = np.zeros((src.shape[0], row_bytes), dtype=np.uint8)
    lib.ggml_quantize_chunk(ggml_type, src.ctypes.data, dst.ctypes.data, 0, src.shape[0], src.shape[1], qw.ctypes.data)
    return dst


@pytest.mark.parametrize("spec", TYPES)
def test_imatrix_bytes_equal_llama_cpp(spec: str, llama_cpp) -> None:
    """The importance-weighted encoders (llama.cpp's ``_impl`` paths; Q8_0 ignores an imatrix)."""
    lib = ggml_library(llama_cpp)
    fmt = qf.resolve_format(spec)
    tensors = load_file(str(default_model_path() / "model.safetensors"))
    real = [v.float() for k, v in sorted(tensors.items()) if v.ndim == 2 and "layers.2." in k]
    for i, w in enumerate([weights(4), *real]):
        imp = importance(w.shape[1], i)
        qw = fmt.quantize(w, imp)
        raw = fmt.ggml_bytes(qw).numpy()
        want = llama_cpp_bytes_with_imatrix(lib, fmt.ggml_type, w, raw.shape[1], imp)
        same = (raw.reshape(-1, fmt.block_bytes) == want.reshape(-1, fmt.block_bytes)).all(-1)
        assert same.all(), f"tensor {i}: {(~same).sum()} of {same.size} blocks differ"
        np.testing.assert_array_equal(qw.dequantize().numpy(), gguf_dequantize(raw, GGMLQuantizationType[spec]))
    if spec != "Q8_0":  # the imatrix changes the encoding
        w = weights(5)
        assert not np.array_equal(fmt.ggml_bytes(fmt.quantize(w, importance(512, 9))).numpy(),
                                  fmt.ggml_bytes(fmt.quantize(w)).numpy())


@pytest.mark.parametrize("spec", TYPES)
def test_per_row_importance_bytes_equal_llama_cpp(spec: str, llama_cpp) -> None:
    """An importance per row (``[rows, cols]``: candidates stacked along the rows, as AWQ's
    search fits them) encodes each row as llama.cpp does with that row's imatrix."""
    lib = ggml_library(llama_cpp)
    fmt = qf.resolve_format(spec)
    w = weights(7)
    parts = [slice(0, 5), slice(5, 17), slice(17, w.shape[0])]
    imps = [importance(w.shape[1], 20 + i) for i in range(len(parts))]
    per_row = torch.cat([imp.expand(p.stop - p.start, -1) for imp, p in zip(imps, parts, strict=True)])
    raw = fmt.ggml_bytes(fmt.quantize(w, per_row)).numpy()
    want = np.concatenate([llama_cpp_bytes_with_imatrix(lib, fmt.ggml_type, w[p], raw.shape[1], imp)
                           for imp, p in zip(imps, parts, strict=True)])
    np.testing.assert_array_equal(raw, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (device machine)")
@pytest.mark.parametrize("spec", TYPES)
def test_cuda_imatrix_bytes_equal_cpu(spec: str) -> None:
    w, imp = weights(6), importance(512, 3)
    fmt = qf.resolve_format(spec)
    cpu = fmt.ggml_bytes(fmt.quantize(w, imp)).numpy()
    gpu = fmt.ggml_bytes(fmt.quantize(w.cuda(), imp.cuda())).cpu().numpy()
    np.testing.assert_array_equal(gpu, cpu)


def test_bits_per_weight_in_descriptions_are_derived_from_the_block_fields() -> None:
    """Each GGML type's bytes per block come from its field list, and the bpw its description
    shows is that size (not a typed-in number): equal to bits_per_weight of a stored weight."""
    for cls in (*LEGACY_FORMATS, *KQUANT_FORMATS):
        fmt = cls(cls.Options())
        assert cls.block_bytes == sum(count * dtype.itemsize for _, dtype, count in cls.fields)
        bpw = fmt.bits_per_weight((4, 256))
        assert cls.description.endswith(f"({bpw:g} bpw)"), (cls.ggml_name, cls.description)
        assert fmt.quantize(torch.randn(4, 256)).nbytes() * 8 / 1024 == bpw


def test_counted_bytes_equal_the_generic_count_from_a_fit() -> None:
    """GGML types count their bytes from the block size (no fit); the core's generic count
    (fit a zero row, add the stored parameters and the packed codes) says the same."""
    from quantfoundry import Format

    for cls in (*LEGACY_FORMATS, *KQUANT_FORMATS):
        fmt = cls(cls.Options())
        for shape in ((3, 512), (7, 768), (1, 256)):
            assert fmt.nbytes(shape) == Format.nbytes(fmt, shape), (cls.ggml_name, shape)
            assert fmt.param_nbytes(shape) == Format.param_nbytes(fmt, shape), (cls.ggml_name, shape)


@pytest.mark.parametrize("spec", [cls.ggml_name for cls in KQUANT_FORMATS])
def test_roundtrip_decodes_the_encoders_own_codes(spec: str) -> None:
    """``Format.roundtrip`` (what AWQ's searches score) skips rounding a second time for
    K-quants; its values are still gguf-py's dequantization of the bytes llama.cpp's encoder
    writes — with and without an importance vector, and on sub-blocks whose scale is 0."""
    fmt = qf.resolve_format(spec)
    w = weights(4)
    w[3, :40] = 0
    w[5, 256:300] = 1e-12
    g = torch.Generator().manual_seed(9)
    for imp in (None, torch.rand(w.shape[1], generator=g), torch.rand(*w.shape, generator=g)):
        qw = fmt.quantize(w, imp)
        want = gguf_dequantize(fmt.ggml_bytes(qw).numpy(), GGMLQuantizationType[spec])
        np.testing.assert_array_equal(fmt.roundtrip(w, imp).numpy(), want)
