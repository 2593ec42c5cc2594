"""``qf merge``: a PEFT LoRA adapter merged into its float base equals W + (alpha/r)·B·A computed
here in float64; the marker records both hashes and reaches the manifest; a second merge, a
quantized base and an adapter folder given to ``qf run`` are refused with the fix."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from quantfoundry.deploy.merge import MARKER, merge
from quantfoundry.errors import AlreadyQuantizedError, ModelLoadError, UsageError
from safetensors.torch import load_file


@pytest.fixture
def base_and_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: give the adapter an update to merge
            p.data = torch.randn(p.shape, generator=g) * 0.05
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    return base, adapter


def test_the_merge_is_the_low_rank_update_by_hand(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    marker = merge(base, adapter, out)
    original = load_file(str(next(base.glob("*.safetensors"))))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"].double()
    b = lora[f"base_model.model.{name}.lora_B.weight"].double()
    want = original[f"{name}.weight"].double() + (8 / 4) * b @ a
    assert merged[f"{name}.weight"].dtype == original[f"{name}.weight"].dtype  # the base's bf16
    torch.testing.assert_close(merged[f"{name}.weight"].double(), want.to(torch.bfloat16).double(), rtol=0, atol=0.02)
    assert not torch.equal(merged[f"{name}.weight"], original[f"{name}.weight"])
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], original[untouched])
    recorded = json.loads((out / MARKER).read_text())
    assert recorded == marker and len(marker["base_sha256"]) == 64 and len(marker["adapter_sha256"]) == 64
    assert marker["rank"] == 4 and marker["alpha"] == 8
    # quantizing the merged checkpoint carries the marker into the manifest
    r = qf.run(str(out), format="int8", out=str(tmp_path / "q"), evaluators=[], progress=False)
    assert r.manifest["source"]["merge"]["adapter_sha256"] == marker["adapter_sha256"]


def test_a_second_merge_and_a_quantized_base_are_refused(base_and_adapter, tmp_path):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    merge(base, adapter, out)
    with pytest.raises(UsageError, match=f"already has adapter .* merged into it.*original base {base.resolve()}"):
        merge(out, adapter, tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    quantized = tmp_path / "q"
    qf.run(str(base), format="int8", out=str(quantized), evaluators=[], progress=False)
    with pytest.raises(AlreadyQuantizedError, match="merging onto quantized weights.*merge onto the fp16/bf16 base"):
        merge(quantized, adapter, tmp_path / "onto-q")


def test_qf_run_on_an_adapter_explains_the_merge(base_and_adapter):
    _, adapter = base_and_adapter
    with pytest.raises(ModelLoadError, match="is a PEFT adapter, not a model: merge it into its base first.*qf merge"):
        qf.run(str(adapter), evaluators=[], progress=False)


def test_the_cli(base_and_adapter, tmp_path):
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    base, adapter = base_and_adapter
    res = CliRunner().invoke(cli, ["merge", "--base", str(base), "--adapter", str(adapter), "--out",
                                   str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "qf run --model" in res.output
    res = CliRunner().invoke(cli, ["merge", "--base", str(base), "--adapter", str(adapter), "--out",
                                   str(tmp_path / "m")])
    assert res.exit_code != 0 and "already exists" in res.output
