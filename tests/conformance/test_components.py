"""Every component a plugin of this repository registers, through the conformance kit
(quantfoundry.testing.conformance): a new format, quantizer, transform, exporter, kernel,
calibrator or evaluator is checked here without anyone writing a test for it."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import quantfoundry as qf
from quantfoundry.plugins import get_plugin_manager
from quantfoundry.testing import conformance as kit
from quantfoundry.testing.tiny import DENSE_ARCHS

#: the distributions of this repository (``None``: the core's built-ins)
REPOSITORY = {None, "qf-gguf", "qf-gptq", "qf-awq", "qf-calibration", "qf-nf4", "qf-bitsandbytes",
              "qf-hqq", "qf-smoothquant", "qf-compressed-tensors", "qf-triton", "qf-quip", "qf-qat", "qf-kl-planner",
              "qf-example-plugin"}
SHARED = Path(os.environ.get("QF_SHARED", Path(__file__).resolve().parents[3] / "shared"))
ROOT = Path(__file__).resolve().parents[2]
CHATS = str(ROOT / "benchmarks" / "data" / "chat" / "chat-calib.jsonl")
CHATML = str(ROOT / "plugins" / "qf-calibration" / "tests" / "data" / "chatml.jinja")

#: what the kit cannot guess: options an evaluator requires, and for GGUF the architectures
#: whose tiny test models llama.cpp tokenizes as transformers does — the tiny models carry
#: pycode-7m's Llama SentencePiece tokenizer, which llama.cpp reads by Gemma's and Qwen2's own
#: vocabulary rules for those architectures (real Gemma/Qwen2 checkpoints bring their own)
EXTRA: dict[str, dict[str, Any]] = {
    "calibration-mismatch": {"options": {"out_domain": str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"),
                                         "max_tokens": "2048"}},
    "gguf": {"architectures": ("llama", "mistral", "qwen3")},
    # the exporter refuses mixtures of experts (transformers keeps their experts fused and
    # bitsandbytes quantizes nn.Linear only); the kernel of that name ignores the key
    "bnb-4bit": {"architectures": DENSE_ARCHS},
    # the kit calibrates with pycode-7m's tokenizer, which has no chat template
    "chat": {"options": {"path": CHATS, "chat_template": CHATML, "n_samples": "3", "seq_len": "40"}},
    "hf-dataset": {"options": {"dataset": CHATS, "chat_template": CHATML, "n_samples": "3", "seq_len": "40"}},
    "mix": {"options": {"parts": "text:1,text:2", "n_samples": "3", "seq_len": "40"}},
    "torch-int4": {"specs": ("int4-g128-sym-sbf16", "int4-g32-sym-sbf16", "int4-g64-sym-sbf16"),
                   # the last two: not tinygemm's tiles (dequantized instead)
                   "shapes": ((96, 256), (48, 512), (24, 256), (32, 192))},
    # compiled for CUDA (plugins/qf-triton/tests and plugins/qf-quip/tests run the kit in Triton's
    # interpreter on CPU)
    "triton-w4a16": {"devices": ("cuda",)},
    "triton-e8p": {"devices": ("cuda",)},
    "qat": {"options": {"steps": 2, "batch": 2, "warmup": 1}},  # the whole pipeline, not the training's result
    "torch-w8a8": {"act_specs": (("int8-sym", "int8"), ("int8-sym", "int8-static"), ("fp8-e4m3", "fp8"),
                                 ("fp8-e4m3-tensor", "fp8-static"), ("int8-sym", "fp8"))},
}


def _entries(role: str) -> list[Any]:
    registry = get_plugin_manager().registry(role)
    return [e for e in registry.entries.values() if e.distribution in REPOSITORY]


def _ident(text: str) -> str:
    return re.sub(r"\W", "_", text)


def _specs() -> list[str]:
    return [spec for e in _entries("format") for spec in (getattr(e.component, "examples", ()) or (e.name,))]


def _classes() -> dict[str, type]:
    out: dict[str, type] = {}
    for spec in _specs():
        out[f"TestFormat_{_ident(spec)}"] = type("F", (kit.FormatConformance,), {"spec": spec})
    for e in _entries("quantizer"):
        if issubclass(e.component, qf.Transform):
            out[f"TestTransform_{_ident(e.name)}"] = type("T", (kit.TransformConformance,), {"transform": e.name})
        else:
            out[f"TestQuantizer_{_ident(e.name)}"] = type("Q", (kit.QuantizerConformance,),
                                                           {"quantizer": e.name, **EXTRA.get(e.name, {})})
    for e in _entries("exporter"):
        out[f"TestExporter_{_ident(e.name)}"] = type("E", (kit.ExporterConformance,),
                                                      {"exporter": e.name, **EXTRA.get(e.name, {})})
    for e in _entries("kernel"):
        out[f"TestKernel_{_ident(e.name)}"] = type("K", (kit.KernelConformance,),
                                                    {"kernel": e.name, "specs": tuple(_specs()),
                                                     **EXTRA.get(e.name, {})})
    for e in _entries("calibrator"):
        out[f"TestCalibrator_{_ident(e.name)}"] = type("C", (kit.CalibratorConformance,),
                                                            {"calibrator": e.name, **EXTRA.get(e.name, {})})
    for e in _entries("planner"):
        out[f"TestPlanner_{_ident(e.name)}"] = type("P", (kit.PlannerConformance,),
                                                     {"planner": e.name, **EXTRA.get(e.name, {})})
    for e in _entries("evaluator"):
        out[f"TestEvaluator_{_ident(e.name)}"] = type("V", (kit.EvaluatorConformance,),
                                                       {"evaluator": e.name, **EXTRA.get(e.name, {})})
    return out


for _name, _cls in _classes().items():
    _cls.__name__ = _cls.__qualname__ = _name
    globals()[_name] = _cls


def test_every_role_of_the_repository_is_covered() -> None:
    """The loops above found the components they should (a plugin missing here would go unchecked)."""
    names = set(_classes())
    for expected in ("TestFormat_int4_g128", "TestFormat_Q4_K", "TestQuantizer_gptq", "TestQuantizer_awq",
                     "TestTransform_awq_scale", "TestQuantizer_mse_rtn", "TestExporter_gguf", "TestExporter_hf_gptq",
                     "TestExporter_hf_awq", "TestExporter_qf", "TestKernel_torch_dequant", "TestCalibrator_text",
                     "TestCalibrator_chat", "TestCalibrator_hf_dataset", "TestCalibrator_mix", "TestFormat_nf4",
                     "TestFormat_fp4", "TestExporter_bnb_4bit", "TestKernel_bnb_4bit", "TestQuantizer_hqq",
                     "TestEvaluator_kl", "TestQuantizer_qat", "TestPlanner_kl"):
        assert expected in names, expected


@pytest.fixture(autouse=True)
def _engines(request) -> None:
    """Exporters whose artifacts an engine serves (GGUF: llama.cpp) need the engine's library."""
    if request.cls is not None and issubclass(request.cls, kit.ExporterConformance):
        request.getfixturevalue("llama_cpp_python")
