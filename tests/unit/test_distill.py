"""``quantfoundry.toolkit.distill``: the distillation loop's loss, schedule, held-out selection and
resumption, on a tiny Llama built from a config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from quantfoundry.testing.tiny import tiny_config
from quantfoundry.toolkit.distill import DistillSettings, distill, kl_to_reference, lr_factor


def _pair(seed: int = 0, noise: float = 0.3):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    reference = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=256, initializer_range=0.2), dtype=torch.float32).eval()
    student = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 256, (10, 24), generator=g)
    return reference, student, ids


def _linears(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "layers" in n and p.dim() == 2]


def test_kl_to_reference_is_the_float64_mean_kl() -> None:
    reference, student, ids = _pair()
    with torch.no_grad():
        got = float(kl_to_reference(student, reference, ids[:3]))
    with torch.no_grad():
        p = torch.softmax(reference(ids[:3]).logits.double(), -1)
        q = torch.softmax(student(ids[:3]).logits.double(), -1)
    want = float((p * (p.log() - q.log())).sum(-1).mean())
    assert got > 0 and math.isclose(got, want, rel_tol=1e-4)
    assert float(kl_to_reference(reference, reference, ids[:3])) == pytest.approx(0.0, abs=1e-6)


def test_schedule_warms_up_then_decays_to_zero() -> None:
    s = DistillSettings(steps=10, lr=1e-3, warmup=2)
    got = [lr_factor(i, s) for i in range(10)]
    assert got[:2] == [0.5, 1.0] and got[2] == 1.0 and got[-1] > 0
    assert all(a >= b for a, b in zip(got[2:], got[3:]))
    assert lr_factor(10, s) == pytest.approx(0.0)


def test_training_lowers_the_held_out_kl_and_keeps_the_best_state() -> None:
    reference, student, ids = _pair()
    params = _linears(student)
    result = distill(student, reference, ids, params,
                     DistillSettings(steps=12, lr=3e-3, batch=2, accumulate=2, warmup=2, eval_every=4))
    assert len(result.losses) == 12 and [s for s, _ in result.held] == [0, 4, 8, 12]
    assert result.best < 0.95 * result.before and result.best_step > 0
    assert sum(result.losses[-4:]) < 0.9 * sum(result.losses[:4])
    # the parameters are left at the best measured state
    with torch.no_grad():
        held = float(kl_to_reference(student, reference, ids[9:]))
    assert held == pytest.approx(result.best, rel=1e-5)


def test_a_worse_run_leaves_the_parameters_untouched() -> None:
    reference, student, ids = _pair()
    params = _linears(student)
    before = [p.detach().clone() for p in params]
    result = distill(student, reference, ids, params, DistillSettings(steps=3, lr=5.0, batch=3))
    assert result.best_step == 0 and result.best == result.before
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_a_stopped_run_resumes_on_the_same_trajectory(tmp_path: Path) -> None:
    """Six steps in one go against four, stopped, then resumed to six from the checkpoint of
    step 4: the same losses, held-out values and final parameters."""
    settings = dict(steps=6, lr=2e-3, batch=2, accumulate=2, warmup=1, eval_every=2, seed=3)
    reference, student, ids = _pair()
    whole = distill(student, reference, ids, _linears(student), DistillSettings(**settings))
    final = [p.detach().clone() for p in _linears(student)]

    reference, student, ids = _pair()
    ckpt = tmp_path / "qat.ckpt"

    class Stop(Exception):
        pass

    def stop_after_4(step: int, loss: float) -> None:
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        distill(student, reference, ids, _linears(student),
                DistillSettings(**settings, checkpoint=ckpt, checkpoint_every=2), progress=stop_after_4)
    assert ckpt.exists()
    reference2, student2, _ = _pair()  # a fresh process: the student as it was before training
    resumed = distill(student2, reference2, ids, _linears(student2),
                      DistillSettings(**settings, checkpoint=ckpt, checkpoint_every=2))
    assert resumed.resumed_from == 4 and not ckpt.exists()
    assert resumed.losses == whole.losses and resumed.held == whole.held
    assert all(torch.equal(a, b) for a, b in zip(_linears(student2), final))


def test_checkpointed_blocks_and_param_groups_change_memory_and_rates_not_the_arithmetic() -> None:
    """Recomputing the blocks' activations in the backward pass gives the same trajectory bit for
    bit; a parameter group with its own learning rate is scheduled like the rest (a group at rate
    zero stays put)."""
    settings = DistillSettings(steps=4, lr=2e-3, batch=2, warmup=1, seed=1)
    reference, student, ids = _pair()
    plain = distill(student, reference, ids, _linears(student), settings)
    reference2, student2, _ = _pair()
    blocks = list(student2.model.layers)
    calls = []
    blocks[0].mlp.register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    again = distill(student2, reference2, ids, _linears(student2), settings, checkpointed=blocks)
    assert again.losses == plain.losses and again.held == plain.held
    assert all(torch.equal(a, b) for a, b in zip(_linears(student), _linears(student2)))
    assert calls.count(True) == 2 * 4  # each training forward ran twice: once without saving, once recomputing
    assert all("forward" not in b.__dict__ for b in blocks)  # put back
    reference3, student3, _ = _pair()
    params = _linears(student3)
    frozen = [p.detach().clone() for p in params[:3]]
    distill(student3, reference3, ids, params, settings,
            param_groups=[{"params": params[:3], "lr": 0.0}, {"params": params[3:]}])
    assert all(torch.equal(p, f) for p, f in zip(params[:3], frozen))
    assert not torch.equal(params[3], _linears(_pair()[1])[3])
    with pytest.raises(ValueError, match="exactly the trained params"):
        distill(student3, reference3, ids, params, settings, param_groups=[{"params": params[:3]}])


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="learning rate"):
        DistillSettings(steps=1, lr=0)
    with pytest.raises(ValueError, match="held_out"):
        DistillSettings(steps=1, lr=1e-3, held_out=1.0)
    with pytest.raises(ValueError, match="checkpoint path"):
        DistillSettings(steps=1, lr=1e-3, checkpoint_every=2)
