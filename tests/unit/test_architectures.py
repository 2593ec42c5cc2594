"""Every built-in architecture map names real modules of the real transformers classes."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry.builtin.architectures import BUILTIN_ARCHITECTURES
from quantfoundry.errors import UnsupportedArchitectureError
from quantfoundry.model.source import find_architecture
from quantfoundry.testing.tiny import TINY_CONFIGS, tiny_config
from torch import nn


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_map_matches_the_real_block(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(config)
    amap = find_architecture(TINY_CONFIGS[arch]["architectures"][0])
    layers = model.get_submodule(amap.layers)
    block = layers[0]
    block_linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert set(amap.linears) == block_linears, "the map must list every linear of the block"
    for group in amap.groups:
        shapes = {block.get_submodule(n).in_features for n in group.linears}
        assert len(shapes) == 1, f"{group.linears} do not share an input width"
        if group.prev_kind == "norm":
            norm = block.get_submodule(group.prev)
            assert norm.weight.shape == (next(iter(shapes)),)
        elif group.prev_kind == "linear":
            prev = block.get_submodule(group.prev)
            assert isinstance(prev, nn.Linear)
    for path in (*amap.embeddings, amap.final_norm, amap.lm_head):
        model.get_submodule(path)


def test_gemma_norm_offset_is_what_the_module_computes() -> None:
    """Folding a scale into a Gemma norm needs weight' = (1 + w)/s - 1: check the offset."""
    from transformers import AutoModelForCausalLM

    for arch in ("gemma", "gemma2", "gemma3"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch))
        amap = find_architecture(TINY_CONFIGS[arch]["architectures"][0])
        norm = model.get_submodule(amap.layers)[0].get_submodule(amap.groups[0].prev)
        x = torch.randn(3, norm.weight.shape[0])
        with torch.no_grad():
            norm.weight.normal_()
            s = torch.rand(norm.weight.shape[0]) + 0.5
            before = norm(x) / s
            norm.weight.copy_((amap.norm_weight_offset + norm.weight) / s - amap.norm_weight_offset)
            after = norm(x)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_names_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        find_architecture("FalconForCausalLM")
    msg = str(info.value)
    assert "FalconForCausalLM is not supported" in msg and "LlamaForCausalLM" in msg
    assert "qf_register_architectures" in msg


def test_a_plugin_can_register_an_architecture(register_plugin) -> None:
    class P:
        @qf.hookimpl
        def qf_register_architectures(self, register):
            register(qf.Architecture("falcon-test", ("FalconForCausalLM",), BUILTIN_ARCHITECTURES[0].groups))

    register_plugin(P(), "falcon")
    assert find_architecture("FalconForCausalLM").name == "falcon-test"
