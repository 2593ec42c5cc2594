"""Issue 16.4: every size figure counts what the artifact stores, the same tensors on both sides."""

from __future__ import annotations

import gguf
import quantfoundry as qf
from safetensors import safe_open


def weights_counted(size: dict, metric: str, column: str) -> float:
    return size[f"{metric}_bytes"][column] * 8 / size[f"{metric}_bpw"][column]


def test_gguf_sizes_are_the_files_tensors(tmp_path) -> None:
    """The user's step: a Q4_K_M run. model_bytes must be the GGUF file's tensor data (its Q4_K
    token embedding and F32 norms included) as gguf-py reads it; artifact_bytes what ships: the GGUF
    file and the Ollama Modelfile beside it."""
    out = tmp_path / "o"
    size = qf.run(format="Q4_K_M", evaluators=["size"], out=out, progress=False).metrics["size"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert size["model_bytes"]["quantized"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf", "quantfoundry.json"]
    assert size["artifact_bytes"]["artifact"] == (out / "model.gguf").stat().st_size + (out / "Modelfile").stat().st_size
    for metric in ("model", "linear"):  # the same tensors in both columns
        assert weights_counted(size, metric, "original") == weights_counted(size, metric, "quantized")
    assert size["linear_bpw"]["original"] == size["model_bpw"]["original"] == 16.0


def test_qf_artifact_sizes_are_its_safetensors(tmp_path) -> None:
    out = tmp_path / "o"
    size = qf.run(format="int4-g64", evaluators=["size"], out=out, progress=False).metrics["size"]
    stored = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert size["model_bytes"]["quantized"] == size["model_bytes"]["artifact"] == stored
    assert size["linear_bytes"]["quantized"] == size["linear_bytes"]["artifact"]
    for metric in ("model", "linear"):
        assert weights_counted(size, metric, "original") == weights_counted(size, metric, "quantized") == \
            weights_counted(size, metric, "artifact")
