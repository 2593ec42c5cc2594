"""The numba encoders (``qf_gguf.native``) against llama.cpp's own ``ggml_quantize_chunk``
(``libggml-base.so`` through ctypes) and against our torch encoders: the same bytes, every type,
without an importance vector (the ``_ref`` encoders), with one ``[cols]`` (the ``_impl``
encoders) and with one per row ``[rows, cols]``."""

from __future__ import annotations

import ctypes

import numba  # noqa: F401  (a dependency of qf-gguf: CI must run these tests, never skip them)
import numpy as np
import pytest
import quantfoundry as qf
import torch
from qf_gguf import native
from safetensors.torch import load_file
from test_formats import ggml_library, importance, weights

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGML_TYPE = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
             "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
         "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}


@pytest.fixture(scope="module")
def lib(llama_cpp) -> ctypes.CDLL:
    return ggml_library(llama_cpp)


@pytest.fixture(scope="module")
def real(shared) -> list[np.ndarray]:
    """A few 2-D tensors of pycode-7m (bf16 weights as float32)."""
    tensors = load_file(str(shared / "models" / "pycode-7m" / "model.safetensors"))
    keep = ("layers.0.", "layers.3.", "lm_head")
    return [np.ascontiguousarray(v.float().numpy()) for k, v in sorted(tensors.items())
            if v.ndim == 2 and any(s in k for s in keep)]


def probes() -> list[np.ndarray]:
    """The branch-probing rows of test_formats (zeros, ±a ties, constants, tails, tiny, huge)."""
    return [np.ascontiguousarray(weights(seed).numpy()) for seed in (0, 1, 2, 3)]


def reference(lib: ctypes.CDLL, spec: str, x: np.ndarray, imp: np.ndarray | None = None) -> np.ndarray:
    """``ggml_quantize_chunk(type, x, dst, 0, rows, cols, imp)``."""
    block, nbytes = BLOCK[spec]
    x = np.ascontiguousarray(x, dtype=np.float32)
    dst = np.zeros((x.shape[0], x.shape[1] // block * nbytes), np.uint8)
    qw = None if imp is None else np.ascontiguousarray(imp, dtype=np.float32)
    n = lib.ggml_quantize_chunk(GGML_TYPE[spec], x.ctypes.data, dst.ctypes.data, 0, x.shape[0], x.shape[1],
                                None if qw is None else qw.ctypes.data)
    assert n == dst.size
    return dst


def assert_same_blocks(spec: str, got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    nbytes = BLOCK[spec][1]
    same = (got.reshape(-1, nbytes) == want.reshape(-1, nbytes)).all(-1)
    assert same.all(), f"{spec} {what}: {(~same).sum()} of {same.size} blocks differ"
    np.testing.assert_array_equal(got, want)


def test_module_surface() -> None:
    assert native.available()
    assert native.TYPES == frozenset(TYPES)
    for spec in TYPES:
        assert qf.resolve_format(spec).block_bytes == BLOCK[spec][1]


@pytest.mark.parametrize("spec", TYPES)
def test_bytes_equal_llama_cpp(spec: str, lib, real) -> None:
    """No importance (``_ref``) and one importance vector for all rows (``_impl``), on the probes
    and on real weights."""
    for i, x in enumerate([*probes(), *real]):
        imp = importance(x.shape[1], i).numpy()
        assert_same_blocks(spec, native.encode(spec, x), reference(lib, spec, x), f"tensor {i}, no importance")
        assert_same_blocks(spec, native.encode(spec, x, imp), reference(lib, spec, x, imp), f"tensor {i}, imatrix")
    if spec != "Q8_0":  # the importance changes the encoding (Q8_0 ignores it, as llama.cpp does)
        x = probes()[0]
        assert not np.array_equal(native.encode(spec, x, importance(512, 9).numpy()), native.encode(spec, x))
    else:
        x = probes()[0]
        np.testing.assert_array_equal(native.encode(spec, x, importance(512, 9).numpy()), native.encode(spec, x))


@pytest.mark.parametrize("spec", TYPES)
def test_per_row_importance_equals_llama_cpp_row_by_row(spec: str, lib, real) -> None:
    """``[rows, cols]`` importance: row r is what llama.cpp writes for that row alone with
    importance[r] as its quant_weights."""
    rng = np.random.default_rng(11)
    for i, x in enumerate([probes()[1], real[0][:96]]):
        rows, cols = x.shape
        imp = (rng.random((rows, cols)) ** 4 * 10.0 ** rng.uniform(-2, 2, (rows, 1)) + 1e-3).astype(np.float32)
        imp[:, ::97] = 0.0
        imp[3] = importance(cols, 5).numpy()
        want = np.concatenate([reference(lib, spec, x[r:r + 1], imp[r]) for r in range(rows)])
        assert_same_blocks(spec, native.encode(spec, x, imp), want, f"tensor {i}, per-row importance")
        # the same vector on every row is the [cols] form
        same = np.ascontiguousarray(np.broadcast_to(imp[3], (rows, cols)))
        np.testing.assert_array_equal(native.encode(spec, x, same), native.encode(spec, x, imp[3]))


@pytest.mark.parametrize("spec", TYPES)
def test_bytes_equal_torch_encoder(spec: str, real, monkeypatch) -> None:
    """The numba bytes are the torch encoder's bytes (``fmt.quantize`` → ``fmt.ggml_bytes``).
    The torch path is forced (``QF_GGUF_NATIVE=0``), and ``native.encode`` is made to fail while
    it runs, so that the formats cannot hand the work to the encoder under test."""
    fmt = qf.resolve_format(spec)
    encode = native.encode

    def not_here(*args, **kwargs):
        raise AssertionError("the torch encoder called qf_gguf.native.encode")

    def torch_bytes(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        w = torch.from_numpy(x)
        with monkeypatch.context() as m:
            m.setenv("QF_GGUF_NATIVE", "0")
            m.setattr(native, "encode", not_here)
            qw = fmt.quantize(w) if imp is None else fmt.quantize(w, torch.from_numpy(imp))
            return fmt.ggml_bytes(qw).numpy()

    tensors = [*probes(), *[r for r in real if r.shape[0] <= 256][:3]]
    for i, x in enumerate(tensors):
        imp = importance(x.shape[1], 30 + i).numpy()
        assert_same_blocks(spec, encode(spec, x), torch_bytes(x, None), f"tensor {i}, no importance")
        assert_same_blocks(spec, encode(spec, x, imp), torch_bytes(x, imp), f"tensor {i}, imatrix")
    x = probes()[2]
    per_row = np.stack([importance(x.shape[1], 40 + r % 3).numpy() for r in range(x.shape[0])])
    assert_same_blocks(spec, encode(spec, x, per_row), torch_bytes(x, per_row), "per-row importance")


def test_primitives() -> None:
    """fp32→fp16 is IEEE round-to-nearest-even with subnormals (numpy's cast), fp16→fp32 exact
    for all 65536 halves (NaNs aside), ``nearest_int`` rounds halves to even, ``roundf`` away
    from zero."""
    from qf_gguf.native import _kernels as k

    @numba.njit
    def run(f32, h16, out16, out32, near, rnd):
        for i in range(f32.shape[0]):
            out16[i] = k.fp32_to_fp16(f32[i])
            near[i] = k.nearest_int(f32[i])
            rnd[i] = k.roundf_int(f32[i])
        for i in range(h16.shape[0]):
            out32[i] = k.fp16_to_fp32(h16[i])

    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000, 0x33000000 + (1 << 16), dtype=np.uint32),  # fp16 subnormal range
                           np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FEFFF, 0x477FF000], np.uint32)])
    f32 = bits.view(np.float32)
    f32 = f32[~np.isnan(f32)]
    halves = np.arange(1 << 16, dtype=np.int64)
    out16 = np.empty(f32.shape, np.int64)
    out32 = np.empty(halves.shape, np.float32)
    near = np.empty(f32.shape, np.int64)
    rnd = np.empty(f32.shape, np.int64)
    run(f32, halves, out16, out32, near, rnd)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out16, f32.astype(np.float16).view(np.uint16).astype(np.int64))
    want32 = halves.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want32)  # ggml quiets a signalling NaN (it multiplies), numpy keeps its bits
    np.testing.assert_array_equal(out32[~nan].view(np.uint32), want32[~nan].view(np.uint32))
    assert np.isnan(out32[nan]).all() and nan.sum() == 2 * 1023
    small = np.abs(f32) < 2**22
    np.testing.assert_array_equal(near[small], np.rint(f32[small]).astype(np.int64))
    tiny = np.abs(f32) < 2**31
    t = np.trunc(f32[tiny])
    want = (t + np.sign(f32[tiny]) * (np.abs(f32[tiny] - t) >= 0.5)).astype(np.int64)
    np.testing.assert_array_equal(rnd[tiny], want)
    halfway = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997], np.float32)
    out = np.empty(6, np.int64)
    run(halfway, halves[:0], out, out32[:0], near[:6], rnd[:6])
    assert list(near[:6]) == [0, 2, 2, 0, -2, 0] and list(rnd[:6]) == [1, 2, 3, -1, -3, 0]


@pytest.mark.parametrize("spec", ["Q4_0", "Q4_K", "Q6_K"])
def test_threads_do_not_change_the_bytes(spec: str) -> None:

    x = probes()[3]
    imp = importance(512, 2).numpy()
    before = numba.get_num_threads()
    try:
        native.set_threads(1)
        assert numba.get_num_threads() == 1
        one = native.encode(spec, x), native.encode(spec, x, imp)
        native.set_threads(10_000)  # clamped to NUMBA_NUM_THREADS
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        many = native.encode(spec, x), native.encode(spec, x, imp)
        native.set_threads(0)  # clamped to 1
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_and_empty_inputs() -> None:
    x = probes()[0]
    wide = np.zeros((x.shape[0], 2 * x.shape[1]), np.float32)
    wide[:, ::2] = x
    np.testing.assert_array_equal(native.encode("Q4_K", wide[:, ::2]), native.encode("Q4_K", x))
    imp = importance(512, 1).numpy()
    np.testing.assert_array_equal(native.encode("Q3_K", x, np.repeat(imp, 2)[::2]),
                                  native.encode("Q3_K", x, np.ascontiguousarray(np.repeat(imp, 2)[::2])))
    out = native.encode("Q6_K", np.zeros((0, 512), np.float32))
    assert out.shape == (0, 420) and out.dtype == np.uint8


def test_input_validation() -> None:
    x = np.zeros((4, 256), np.float32)
    with pytest.raises(ValueError, match="unknown GGML type"):
        native.encode("Q7_K", x)
    with pytest.raises(ValueError, match="unknown GGML type"):
        native.encode("q4_0", x)
    with pytest.raises(ValueError, match="not whole blocks of 256"):
        native.encode("Q4_K", np.zeros((4, 288), np.float32))
    with pytest.raises(ValueError, match="not whole blocks of 32"):
        native.encode("Q8_0", np.zeros((4, 48), np.float32))
    with pytest.raises(ValueError, match="float32"):
        native.encode("Q4_0", x.astype(np.float64))
    with pytest.raises(ValueError, match="float32"):
        native.encode("Q4_0", torch.zeros(4, 256))
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        native.encode("Q4_0", np.zeros(256, np.float32))
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        native.encode("Q4_0", np.zeros((2, 4, 256), np.float32))
    with pytest.raises(ValueError, match="importance must be a float32"):
        native.encode("Q4_K", x, np.ones(256, np.float64))
    with pytest.raises(ValueError, match="importance must be"):
        native.encode("Q4_K", x, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="importance must be"):
        native.encode("Q4_K", x, np.ones((3, 256), np.float32))
    with pytest.raises(ValueError, match="importance must be"):
        native.encode("Q8_0", x, np.ones((4, 256, 1), np.float32))


# ---------------------------------------------------------------- search kernels


def lane_qkx_oracle(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    le_test: bool) -> tuple[np.float32, np.float32, np.ndarray]:
    """``make_qkx2/3_quants`` (ggml-quants.c, squared error) in numpy float32 scalars, each
    candidate's sums taken in 8 interleaved lanes (element i into lane i mod 8, in index order)
    and the lanes added pairwise — the documented order of ``make_qkx_quants_lanes``."""
    f = np.float32
    n = len(x)

    def lanes(p: list) -> np.float32:
        acc = list(p[:8])
        for i in range(8, n):
            acc[i % 8] = f(acc[i % 8] + p[i])
        for h in (4, 2, 1):
            acc = [f(acc[j] + acc[j + h]) for j in range(h)]
        return acc[0]

    mn, mx = x[0], x[0]
    sum_w, sum_x = w[0], f(w[0] * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = f(sum_w + w[i])
        sum_x = f(sum_x + f(w[i] * x[i]))
    mn = min(mn, f(0))
    if (mx <= mn) if le_test else (mx == mn):
        return f(0), f(-mn), np.zeros(n, np.int32)
    iscale = f(f(nmax) / f(mx - mn))
    scale = f(f(1) / iscale)
    L = np.clip(np.rint(iscale * (x - mn)), 0, nmax).astype(np.int32)
    best = f(0)
    for i in range(n):
        d = f(f(f(scale * f(L[i])) + mn) - x[i])
        best = f(best + f(w[i] * f(d * d)))
    for s in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(s))) + f(nmax)) / f(mx - mn))
        fl = np.clip(np.rint(f(iscale) * (x - mn)), 0, nmax).astype(np.float32)
        wl = w * fl
        sl, sl2, sxl = lanes(wl), lanes(wl * fl), lanes(wl * x)
        D = f(f(sum_w * sl2) - f(sl * sl))
        if not D > 0:
            continue
        this_scale = f(f(f(sum_w * sxl) - f(sum_x * sl)) / D)
        this_min = f(f(f(sl2 * sum_x) - f(sl * sxl)) / D)
        if this_min > 0:
            this_min, this_scale = f(0), f(sxl / sl2)
        diff = this_scale * fl + this_min - x
        err = lanes(w * (diff * diff))
        if err < best:
            L, best, scale, mn = fl.astype(np.int32), err, this_scale, this_min
    return scale, f(-mn), L


def test_lane_search_equals_its_float32_oracle() -> None:
    """``make_qkx_quants_lanes`` (the search kernels' scale search) is the numpy oracle bit for
    bit, for Q4_K/Q5_K's 32-element sub-blocks with and without quant weights and Q2_K's 16."""
    from qf_gguf.native import _kernels as k

    @numba.njit
    def run(x, w, L, Laux, nmax, rmin, rdelta, nstep, le_test):
        return k.make_qkx_quants_lanes(x.shape[0], nmax, x, w, L, Laux, rmin, rdelta, nstep, False, le_test)

    rng = np.random.default_rng(5)
    f = np.float32
    cases = [(32, 15, -1.0, 0.1, 20, False), (32, 15, -0.9, 0.05, 36, True), (32, 31, -0.5, 0.1, 15, False),
             (16, 3, -0.5, 0.1, 15, False), (16, 3, -0.9, 0.05, 36, True)]
    for n, nmax, rmin, rdelta, nstep, le_test in cases:
        for t in range(60):
            x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1) + (t % 3 == 0) * 0.05).astype(np.float32)
            w = (rng.random(n) ** 3 + 1e-3).astype(np.float32) if le_test else np.abs(x) + f(0.01)
            L, Laux = np.empty(n, np.int32), np.empty(n, np.int32)
            scale, the_min = run(x, w, L, Laux, nmax, f(rmin), f(rdelta), nstep, le_test)
            want = lane_qkx_oracle(x, w, nmax, rmin, rdelta, nstep, le_test)
            assert (f(scale), f(the_min)) == want[:2], (n, nmax, t)
            np.testing.assert_array_equal(L, want[2])


@pytest.mark.parametrize("spec", TYPES)
def test_search_kernels(spec: str, lib, real) -> None:
    """``encode(search=True)``: the exact bytes for the types without a qkx search; for the
    others llama.cpp's bytes in most blocks, and in the rest a fit whose weighted error is
    within rounding of llama.cpp's (they differ only where candidates tie within a rounding)."""
    fmt = qf.resolve_format(spec)
    lanes = spec in ("Q2_K", "Q4_K", "Q5_K", "Q4_1", "Q5_1")
    for i, x in enumerate([probes()[0], real[1]]):
        imp = importance(x.shape[1], i).numpy()
        for q in (None, imp):
            got, want = native.encode(spec, x, q, search=True), reference(lib, spec, x, q)
            if not lanes:
                assert_same_blocks(spec, got, want, f"tensor {i}, search kernel")
                continue
            nbytes = BLOCK[spec][1]
            same = (got.reshape(-1, nbytes) == want.reshape(-1, nbytes)).all(-1).mean()
            assert same >= 0.9, (i, same)
            qw = np.ones_like(x) if q is None else np.broadcast_to(q, x.shape)

            def err(raw: np.ndarray, x: np.ndarray = x, qw: np.ndarray = qw) -> float:
                qwt = fmt.from_ggml_bytes(torch.from_numpy(raw), x.shape)
                return float((qw * (fmt.dequantize(qwt).numpy() - x) ** 2).sum())

            assert err(got) <= err(want) * 1.002, (i, err(got), err(want))


@pytest.mark.parametrize("spec", sorted(native.DECODES))
def test_decode_equals_gguf_py_and_the_format(spec: str, real) -> None:
    """``native.decode``: the values of encoded rows bit for bit as gguf-py's
    ``quants.dequantize`` (llama.cpp's ``dequantize_row_*`` in numpy) and as the format's own
    torch decode, on the branch-probing rows and real weights, with and without importance."""
    from gguf import GGMLQuantizationType, quants

    fmt = qf.resolve_format(spec)
    for i, x in enumerate([*probes(), real[1]]):
        for q in (None, importance(x.shape[1], i).numpy()):
            raw = native.encode(spec, x, q)
            got = native.decode(spec, raw)
            want = quants.dequantize(raw, getattr(GGMLQuantizationType, spec)).reshape(x.shape)
            np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
            ours = fmt.dequantize(fmt.from_ggml_bytes(torch.from_numpy(raw), x.shape)).numpy()
            np.testing.assert_array_equal(got.view(np.uint32), ours.view(np.uint32))
    with pytest.raises(ValueError, match="no compiled decoder"):
        native.decode("Q4_0", np.zeros((1, 18), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        native.decode(spec, np.zeros((1, 7), np.uint8))
