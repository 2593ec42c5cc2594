"""Scale folding (quantfoundry.toolkit.fold): exact in float64 for every built-in architecture."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry import resolve_model
from quantfoundry.model.materialize import load_full_model
from quantfoundry.roles.architecture import concrete_groups
from quantfoundry.testing.tiny import TINY_CONFIGS
from quantfoundry.toolkit import Tie, apply_fold, fold_point
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_folding_leaves_the_float_model_unchanged(tiny_model, arch):
    """Every fold point of every built-in architecture (norms with Gemma's 1 + w, v → o under
    GQA with one scale per KV channel, up → down, q/k/v biases of Qwen2; a MoE's experts and
    shared expert with the router and the shared expert's gate taking the scale, each expert's
    down into its own up): random scales folded into every group of every layer of the model as
    the pipeline builds it (a MoE's experts split into linears), float64 logits unchanged."""
    folder = tiny_model(arch)
    source = resolve_model(folder)
    model = load_full_model(source, dtype=torch.float64, device=torch.device("cpu")).eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    archmap = source.architecture
    gen = torch.Generator().manual_seed(1)
    folded = readers = 0
    for i, layer in enumerate(model.model.layers):
        block = qf.Block(i, f"model.layers.{i}", layer, archmap, {})
        modules = [n for n, _ in layer.named_modules()]
        linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        groups = [g for pattern in archmap.groups for g in concrete_groups(pattern, modules)]
        groups = [g for g in groups if any(archmap.match(p, linears) for p in g.linears) and g.prev is not None]
        for group in groups:
            lins = [block.linear(n) for p in group.linears for n in archmap.match(p, linears)]
            point = fold_point(block, group, lins[0].in_features, source.config, allow_gqa=True)
            assert not isinstance(point, str), point
            n = lins[0].in_features // (point.tie.heads_per_kv if point.tie else 1)
            searched = torch.exp(torch.randn(n, generator=gen, dtype=torch.float64))
            scale = point.tie.expand(searched) if point.tie else searched
            apply_fold(point, lins, scale, searched, archmap.norm_weight_offset, torch.float64, quantized_prev=True)
            folded += 1
            readers += len(point.readers)
    with torch.no_grad():
        after = model(ids).logits
    # attention 2, experts' gate/up (with the shared expert's) 1, each expert's down 1 (4
    # experts), the shared expert's down 1; readers: the router, and Qwen2-MoE's shared gate
    layers = len(model.model.layers)
    groups, routers = {"mixtral": (7, 1), "qwen2_moe": (8, 2), "qwen3_moe": (7, 1), "olmoe": (7, 1)}.get(arch, (4, 0))
    if arch.startswith("deepseek"):  # latent attention: q_a/kv_a (q_proj), [q_b], kv_b; o_proj has none
        attn = 3 if arch == "deepseek_v3" else 2
        # layer 0 dense (gate/up, down), layer 1: experts' and shared experts' gate/up, 4 downs, shared down
        assert (folded, readers) == (attn + 2 + attn + 1 + 4 + 1, 1)
    else:
        assert (folded, readers) == (groups * layers, routers * layers)
    # transformers' RMSNorms normalise in float32 even in a float64 model, so a 1e-16 change of
    # the residual stream can flip a float32 rounding: agreement to float32 round-off (a wrong
    # fold is off by O(1)); the folds themselves are float64 arithmetic
    torch.testing.assert_close(after, before, rtol=2e-6, atol=2e-6)


def test_tie_reduces_and_expands_per_kv_channel():
    """Under GQA (2 query heads per KV head, head_dim 2), input channel c of o_proj reads KV
    channel c // 4 * 2 + c % 2: reduce averages each tied set, expand repeats it."""
    tie = Tie(head_dim=2, heads_per_kv=2)
    assert tie.index(8, torch.device("cpu")).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert tie.reduce(v).tolist() == [2.0, 3.0, 6.0, 7.0]
    assert tie.expand(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [1, 2, 1, 2, 3, 4, 3, 4]


def test_a_group_without_a_fold_point_says_why(tiny_model):
    folder = tiny_model("llama")
    source = resolve_model(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    block = qf.Block(0, "model.layers.0", model.model.layers[0], source.architecture, {})
    group = qf.InputGroup(("self_attn.q_proj",), None, "none")
    assert "no fold point" in fold_point(block, group, 64, source.config, allow_gqa=True)
    gqa = source.architecture.groups[1]  # v_proj -> o_proj, 4 query heads over 2 KV heads
    assert "fold_gqa=false" in fold_point(block, gqa, 64, source.config, allow_gqa=False)
