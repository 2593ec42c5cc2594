"""Quantized inputs are refused with the way to the float source, and ``--force-requantize``
dequantizes them first (checked against gguf-py's and qf's own dequantization) and says that the
report measures the second rounding alone."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from quantfoundry.data import default_model_path
from quantfoundry.errors import AlreadyQuantizedError
from safetensors.torch import load_file

PYCODE = str(default_model_path())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    qf.run(PYCODE, format="int8", out=str(root / "qf"), evaluators=[("kl", {"max_tokens": "4096"})], progress=False)
    qf.run(PYCODE, exporter="gguf", format="Q8_0", out=str(root / "gguf"), evaluators=[], progress=False)
    return root


def test_a_gguf_file_is_refused_with_the_way_back(artifacts, tmp_path):
    with pytest.raises(AlreadyQuantizedError, match="GGUF file.*original fp16/bf16 checkpoint of 'pycode-7m'.*--force-requantize"):
        qf.run(str(artifacts / "gguf" / "model.gguf"), out=str(tmp_path / "x"), evaluators=[], progress=False)
    with pytest.raises(AlreadyQuantizedError, match="GGUF file"):  # a folder holding only the GGUF
        only = tmp_path / "only"
        only.mkdir()
        (only / "m.gguf").write_bytes((artifacts / "gguf" / "model.gguf").read_bytes())
        qf.run(str(only), evaluators=[], progress=False)


def test_a_qf_artifact_names_its_source(artifacts):
    with pytest.raises(AlreadyQuantizedError, match=f"qf artifact: quantize the original.*\\({PYCODE}\\)"):
        qf.run(str(artifacts / "qf"), evaluators=[], progress=False)


def test_a_quantized_checkpoint_names_its_method(tmp_path):
    folder = tmp_path / "gptq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "_name_or_path": "org/base",
                                                   "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(AlreadyQuantizedError, match=r"already quantized \(gptq\).*\(org/base\) instead"):
        qf.run(str(folder), evaluators=[], progress=False)


def test_force_requantize_a_qf_artifact(artifacts, tmp_path):
    notes: list[str] = []
    r = qf.run(str(artifacts / "qf"), format="int4-g64", force_requantize=True, out=str(tmp_path / "again"),
               evaluators=[("kl", {"max_tokens": "4096"})], report=notes.append, progress=False)
    said = " ".join(r.notes)
    assert "dequantized with qf load" in said and "second rounding's loss alone" in said
    assert "the first rounding's KL to its original was" in said
    # the float input is the first artifact's values exactly (bf16 holds int8 x a float16 scale... to bf16)
    folder = r.manifest["source"]["path"]
    weights = load_file(f"{folder}/model.safetensors")
    first = qf.load(str(artifacts / "qf"))
    name = "model.layers.2.mlp.down_proj"
    want = first.get_submodule(name).qweight.dequantize(torch.float32).to(torch.bfloat16)
    assert torch.equal(weights[f"{name}.weight"], want)
    assert r.metrics["kl"]["kl_mean"]["quantized"] > 0


def test_force_requantize_a_gguf(artifacts, tmp_path):
    import gguf

    r = qf.run(str(artifacts / "gguf" / "model.gguf"), format="int8", force_requantize=True,
               out=str(tmp_path / "again"), evaluators=[], progress=False)
    assert any("transformers' GGUF reader" in n for n in r.notes)
    weights = load_file(f"{r.manifest['source']['path']}/model.safetensors")
    reader = gguf.GGUFReader(str(artifacts / "gguf" / "model.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(
        [int(x) for x in reversed(t.shape)])
    assert torch.equal(weights["model.layers.1.mlp.down_proj.weight"], want.to(torch.bfloat16))


def test_a_gguf_transformers_reads_only_in_part_is_refused(tiny_model, tmp_path):
    """llama.cpp writes Mixtral as "llama" with experts; transformers' GGUF reader builds a dense
    llama from it and leaves its MLPs at their random initialization. That is refused, not
    requantized."""
    from quantfoundry.errors import ModelLoadError

    folder = tiny_model("mixtral", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        intermediate_size=256)
    qf.run(folder, exporter="gguf", format="Q8_0", out=str(tmp_path / "g"), evaluators=[], progress=False)
    with pytest.raises(ModelLoadError, match=r"builds 'llama' from model.gguf without 6 of its weights "
                                             r"\(model.layers.0.mlp.down_proj.weight, ...\)"):
        qf.run(str(tmp_path / "g" / "model.gguf"), format="int8", force_requantize=True, out=str(tmp_path / "x"),
               evaluators=[], progress=False)
    assert not (tmp_path / "x").exists()
