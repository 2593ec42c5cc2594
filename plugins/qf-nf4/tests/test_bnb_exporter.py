"""``bnb-4bit`` checkpoints load in transformers with bitsandbytes (CPU) and compute what our
in-memory model computes; GPTQ rounds onto NF4 and the result loads the same way."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch

# bitsandbytes is a testing dependency (qf-nf4[testing]): without it these tests fail, never skip


@pytest.mark.parametrize(("quantizer", "fmt"), [("rtn", "nf4"), ("rtn", "fp4-b128"), ("gptq", "nf4"),
                                               ("rtn", "nf4-dq"), ("gptq", "fp4-dq")])
def test_transformers_with_bitsandbytes_loads_the_checkpoint(quantizer, fmt, tiny_model, tmp_path) -> None:
    import bitsandbytes as bnb

    folder = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path / "bnb"
    r = qf.run(str(folder), quantizer=quantizer, format=fmt, exporter="bnb-4bit", out=out, keep_model=True,
               progress=False, calibrator_options={"n_samples": "4", "seq_len": "64"},
               evaluators=[("kl", {"max_tokens": "1024"})])
    assert not [n for n in r.notes if n.startswith("MISMATCH")], r.notes
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_4bit"] is True
    assert cfg["bnb_4bit_quant_type"] == fmt[:3] and cfg["bnb_4bit_use_double_quant"] is fmt.endswith("-dq")
    assert "lm_head" in cfg["llm_int8_skip_modules"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and isinstance(model.lm_head, torch.nn.Linear)
    ours_qw = r.model.get_submodule("model.layers.0.self_attn.q_proj").qweight
    # bitsandbytes' own dequantization of the stored weight is ours, bit for bit (before the first
    # forward: on the CPU bitsandbytes then repacks the weight for its kernel)
    assert q_proj.weight.quant_state.nested is fmt.endswith("-dq")
    deq = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state).float()
    assert torch.equal(deq, ours_qw.dequantize())
    # and qf reads the checkpoint back to the same weights
    again = qf.load(out).get_submodule("model.layers.0.self_attn.q_proj").qweight
    assert again.format == ours_qw.format and torch.equal(again.dequantize(), ours_qw.dequantize())
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = r.model.float()(input_ids=ids).logits.float()
        served = model(input_ids=ids).logits.float()  # as transformers serves it: bf16 here (the checkpoint's)
        # the same modules in float32 (transformers keeps the float ones in the checkpoint's dtype,
        # bitsandbytes computes in its compute dtype): then the logits are ours
        exact_model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32)
        for m in exact_model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.compute_dtype, m.compute_type_is_set, m.support_avx512bf16_for_cpu = torch.float32, True, False
        for p in exact_model.parameters():
            if p.is_floating_point():
                p.data = p.data.float()
        exact = exact_model(input_ids=ids).logits.float()
    torch.testing.assert_close(exact, ours, rtol=1e-4, atol=1e-4)
    assert float((served - ours).norm() / ours.norm()) < 0.03  # bf16 arithmetic
    assert (served.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_only_bitsandbytes_formats_are_stored(tiny_model, tmp_path) -> None:
    with pytest.raises(qf.QFError, match="holds nf4 or fp4, not int4-g128"):
        qf.run(str(tiny_model("llama")), format="int4-g128", exporter="bnb-4bit", out=tmp_path / "x", progress=False)


def test_the_deploy_command_runs_as_written(tiny_model, tmp_path) -> None:
    """docs/deploy.md's transformers line, which is also what ``qf run`` prints last."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bnb"
    r = qf.run(str(tiny_model("llama")), format="nf4", exporter="bnb-4bit", out=out, progress=False, evaluators=[])
    assert r.run_command is not None
    deploy = (Path(__file__).resolve().parents[3] / "docs" / "deploy.md").read_text()
    body = deploy.split("## `bnb-4bit`", 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("python -c ")]
    assert lines == [r.run_command.split("  # needs")[0].replace(str(out), "OUT")]
    argv = shlex.split(lines[0].replace("OUT", str(out)))
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith("Once upon a time") or "Once upon a time" in done.stdout


def test_a_mixture_of_experts_is_refused_before_any_work(tiny_model, tmp_path) -> None:
    """transformers keeps a MoE's experts fused and bitsandbytes quantizes nn.Linear only: no
    engine would load per-expert NF4 weights (transformers 5.25 fails on such a checkpoint)."""
    from quantfoundry.errors import UsageError

    with pytest.raises(UsageError, match="mixture of experts.*compressed-tensors, gguf or hf-gptq"):
        qf.run(tiny_model("qwen3_moe"), exporter="bnb-4bit", out=tmp_path / "out", evaluators=[], progress=False)
    assert not (tmp_path / "out").exists()
