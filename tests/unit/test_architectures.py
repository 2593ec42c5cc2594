"""Every built-in architecture map names real modules of the real transformers classes."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry.builtin.architectures import BUILTIN_ARCHITECTURES
from quantfoundry.errors import UnsupportedArchitectureError
from quantfoundry.model.experts import unfuse_experts
from quantfoundry.model.source import find_architecture
from quantfoundry.roles.architecture import concrete_groups
from quantfoundry.testing.tiny import TINY_CONFIGS, tiny_config
from torch import nn


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_map_matches_the_real_block(arch: str) -> None:
    """On the skeleton the pipeline builds (a MoE's fused experts split into linears under the
    checkpoint's names): every linear of every block is a map linear or a float reader of a
    group; every map entry names real modules; each group shares one input width, with a norm
    or linear of that width before it and readers that read that width. (Qwen's MoE maps also
    list the plain MLP of ``mlp_only_layers``: the tiny model gets one such layer.)"""
    from transformers import AutoModelForCausalLM

    overrides = {"mlp_only_layers": [1]} if arch in ("qwen2_moe", "qwen3_moe") else {}
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    amap = find_architecture(TINY_CONFIGS[arch]["architectures"][0])
    unfuse_experts(model, amap.expert_linears, amap.module_aliases)
    used: set[str] = set()
    for block in model.get_submodule(amap.layers):
        modules = [n for n, _ in block.named_modules()]
        block_linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        mapped = {n for pat in amap.linears for n in amap.match(pat, block_linears)}
        readers = {r for pattern in amap.groups for g in concrete_groups(pattern, modules) for r in g.readers}
        assert block_linears - mapped <= readers, "every linear of a block is in the map or reads for a group"
        for pattern in amap.groups:
            for group in concrete_groups(pattern, modules):
                members = [n for pat in group.linears for n in amap.match(pat, block_linears)]
                if not members:
                    continue
                used.add(pattern.linears[0])
                shapes = {block.get_submodule(n).in_features for n in members}
                assert len(shapes) == 1, f"{group.linears} do not share an input width"
                width = next(iter(shapes))
                if group.prev_kind == "norm":
                    assert block.get_submodule(group.prev).weight.shape == (width,)
                elif group.prev_kind == "linear":
                    assert isinstance(block.get_submodule(group.prev), nn.Linear)
                for reader in group.readers:
                    assert block.get_submodule(reader).weight.shape[1] == width
    unused = {"deepseek_v2": {"self_attn.q_b_proj"}}.get(arch, set())  # V2-Lite: one q_proj (V3 has q_a/q_b)
    assert used == {g.linears[0] for g in amap.groups} - unused, "every group of the map is in some block"
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
