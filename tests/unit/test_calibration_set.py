"""CalibrationSet: samples of their own lengths, batched by length (never padded), hashed by
their ids; and the statistics a quantizer collects from them hold real tokens only — checked
against the float64 model run on each sample alone."""

from __future__ import annotations

import hashlib

import pytest
import torch
from quantfoundry import CalibrationSet
from quantfoundry.model.blocks import BlockStream
from quantfoundry.model.source import resolve_model
from quantfoundry.toolkit import collect_input_stats

SEQS = [torch.arange(5), torch.arange(10, 13), torch.arange(20, 25), torch.arange(30, 32), torch.arange(40, 43)]


def test_sequences_of_several_lengths_are_batched_by_length_in_order() -> None:
    cal = CalibrationSet.from_sequences(SEQS, "test")
    assert cal.n_samples == 5 and cal.n_tokens == 18 and not cal.uniform
    assert [s.tolist() for s in cal.samples()] == [s.tolist() for s in SEQS]
    batches = cal.batches(2)
    assert [b.tolist() for b in batches] == [
        [SEQS[0].tolist(), SEQS[2].tolist()],   # length 5 (longest first)
        [SEQS[1].tolist(), SEQS[4].tolist()],   # length 3, in their order
        [SEQS[3].tolist()],                     # length 2
    ]
    assert sum(b.numel() for b in batches) == cal.n_tokens  # no padding anywhere


def test_windows_stay_one_tensor() -> None:
    ids = torch.arange(24).view(4, 6)
    cal = CalibrationSet.from_sequences(list(ids), "windows")
    assert cal.uniform and cal.lengths is None and torch.equal(cal.input_ids, ids)
    assert [b.tolist() for b in cal.batches(3)] == [ids[:3].tolist(), ids[3:].tolist()]


def test_ids_sha256_is_the_documented_formula() -> None:
    h = hashlib.sha256()
    for s in SEQS:
        h.update(len(s).to_bytes(8, "little") + s.to(torch.int64).numpy().tobytes())
    assert CalibrationSet.from_sequences(SEQS, "test").ids_sha256 == h.hexdigest()
    # the padding value does not enter the hash
    assert CalibrationSet.from_sequences(SEQS, "test", pad_id=7).ids_sha256 == h.hexdigest()


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[n_samples, seq_len\]"):
        CalibrationSet(torch.arange(4), "x")
    with pytest.raises(ValueError, match="between 1 and the row length"):
        CalibrationSet(torch.zeros(2, 4, dtype=torch.long), "x", lengths=torch.tensor([4, 5]))


def test_statistics_from_unpadded_samples_equal_each_sample_run_alone(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in (17, 9, 17, 4, 9, 30)]
    cal = CalibrationSet.from_sequences(seqs, "random")
    source = resolve_model(folder)
    stream = BlockStream(source, calibration=cal, batch_size=2)
    blocks = iter(stream)
    next(blocks)
    block1 = next(blocks)
    ours = collect_input_stats(block1, ["mlp.down_proj"], want=("gram",))["mlp.down_proj"]

    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    gram = torch.zeros_like(ours.gram, dtype=torch.float64)
    count = 0

    def hook(_m, args):
        nonlocal gram, count
        x = args[0].reshape(-1, args[0].shape[-1])
        gram += x.T @ x
        count += x.shape[0]

    ref_model.model.layers[1].mlp.down_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for s in seqs:
            ref_model(input_ids=s[None])
    assert ours.count == count == cal.n_tokens
    torch.testing.assert_close(ours.gram.double(), gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()))
