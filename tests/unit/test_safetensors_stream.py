"""Our streaming writer against the safetensors library's own reader."""

from __future__ import annotations

import json

import pytest
import quantfoundry as qf
import torch
from quantfoundry.toolkit.safetensors_stream import StreamingSafetensorsWriter
from safetensors import safe_open
from safetensors.torch import load_file


def test_roundtrip_through_the_safetensors_reader(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(7, 33, generator=gen).to(torch.bfloat16),
        "b.f16": torch.randn(5, generator=gen).to(torch.float16),
        "c.f32": torch.randn(2, 3, 4, generator=gen),
        "d.u8": torch.randint(0, 256, (1001,), generator=gen).to(torch.uint8),
        "e.i32": torch.randint(-9, 9, (3, 3), generator=gen).to(torch.int32),
        "f.empty": torch.zeros(0, 4),
        "g.noncontig": torch.randn(6, 4, generator=gen).t(),
    }
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        w.add(k, v)
    with pytest.raises(ValueError, match="added twice"):
        w.add("a.bf16", tensors["a.bf16"])
    w.close({"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_sharded_artifact_reloads(tmp_path) -> None:
    out = tmp_path / "o"
    qf.run(format="int8", exporter_options={"shard_mb": "2"}, out=out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and all((out / f).is_file() for f in files)
    model = qf.load(out)
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = qf.run(format="int8", out=None, keep_model=True, progress=False).model
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
