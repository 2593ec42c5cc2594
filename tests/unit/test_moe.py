"""Mixtures of experts: experts split into linears, calibration tokens reaching every expert,
and the round-to-nearest fallback for an expert that sees too few."""

from __future__ import annotations

import pytest
import quantfoundry as qf
import torch
from quantfoundry.errors import UsageError
from quantfoundry.model.blocks import BlockStream
from quantfoundry.model.experts import expert_calibration, expert_lists, routed_token_counts
from quantfoundry.model.materialize import load_full_model
from quantfoundry.testing.tiny import MOE_ARCHS
from safetensors import safe_open
from transformers import AutoModelForCausalLM


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_experts_compute_what_transformers_fused_experts_compute(tiny_model, arch):
    """The skeleton holds each expert as linears under the checkpoint's own tensor names, and
    the model computes, to the last bit, what transformers' fused experts compute."""
    folder = tiny_model(arch, dtype=torch.float32)
    source = qf.resolve_model(folder)
    ours = load_full_model(source, dtype=torch.float32, device=torch.device("cpu")).eval()
    names = {n for n, _ in ours.named_parameters()}
    assert names <= set(source.tensor_info) | {"lm_head.weight"}
    experts = [n for n in names if ".experts." in n]
    assert source.moe_layers == (1 if arch.startswith("deepseek") else 2)  # DeepSeek's layer 0 is dense
    assert len(experts) == source.moe_layers * 4 * 3  # layers x experts x (gate, up, down)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_the_artifact_computes_what_the_quantized_model_computes(tiny_model, tmp_path, arch):
    """Every MoE map end to end (GPTQ with ``fill`` routing, the ``qf`` exporter): the written
    artifact, reopened, scores exactly what the in-memory model scores — per-expert tensors,
    float routers, DeepSeek-V3's stored score-correction bias (a buffer) included."""
    r = qf.run(tiny_model(arch), quantizer="gptq", calibrator_options={"n_samples": 4, "seq_len": 64},
               out=tmp_path / "out", evaluators=["perplexity"], progress=False)
    ppl = r.metrics["perplexity"]["perplexity"]
    assert ppl["artifact"] == ppl["quantized"] != ppl["original"]
    assert not any("MISMATCH" in n for n in r.manifest["notes"])


def _first_block(folder, samples=4, seq=16):
    source = qf.resolve_model(folder)
    ids = torch.randint(0, 4096, (samples, seq), generator=torch.Generator().manual_seed(3))
    stream = BlockStream(source, calibration=ids, batch_size=2)
    return stream, next(iter(stream))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_routing_reaches_every_expert_and_leaves_the_outputs_alone(tiny_model, arch):
    """``all``: every expert's linears see every token; ``fill``: in each batch of ``n`` tokens
    (of ``total``), an expert routed fewer than ``ceil(min_tokens · n / total)`` sees its routed
    tokens plus the most probable others up to that many (computed here in float64 from the
    router's input); ``topk``: the router's choice. In every mode the block's output is the
    top-k output."""
    stream, block = _first_block(tiny_model(arch, dtype=torch.float32))
    total, k = 4 * 16, 2
    (name,) = expert_lists(block.module)
    gate = block.architecture.expert_linears[0]
    routed = routed_token_counts(block)[name]
    batches = _router_inputs(block)  # per batch: (normed inputs, float64 routing probabilities)
    tops = [p.topk(k, dim=-1).indices for _x, p in batches]
    assert routed.tolist() == [sum(int((t == e).sum()) for t in tops) for e in range(4)]
    plain = torch.cat(block.run())
    min_tokens = int(routed.max()) + 3  # every expert is short of it
    for routing in ("topk", "fill", "all"):
        seen: dict[int, list[torch.Tensor]] = {}
        names = [f"{name}.{e}.{gate}" for e in range(4)]
        with expert_calibration(block.module, routing, min_tokens, total) as counts, \
                block.capture_inputs(names, lambda n, x, seen=seen: seen.setdefault(int(n.split(".")[-2]), []).append(x)):
            out = torch.cat(block.run())
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
        for e in range(4):
            rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[e]])
            expect = []
            for (x, p), top in zip(batches, tops, strict=True):
                chosen = (top == e).any(-1) if routing != "all" else torch.ones(len(x), dtype=torch.bool)
                quota = min(len(x), -(-min_tokens * len(x) // total))
                if routing == "fill" and int(chosen.sum()) < quota:
                    score = p[:, e].masked_fill(chosen, -1.0)
                    chosen[score.topk(quota - int(chosen.sum())).indices] = True
                expect.append(x[chosen])
            expect = torch.cat(expect)
            assert rows.shape[0] == expect.shape[0] == int(counts[name][e])
            assert _rowset(rows) == _rowset(expect)
            if routing == "fill":
                assert rows.shape[0] >= min_tokens


def _router_inputs(block):
    router = block.module.get_submodule(next(iter(expert_lists(block.module))).rpartition(".")[0]).gate
    xs: list[torch.Tensor] = []
    handle = router.register_forward_hook(lambda _m, args, _o: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        block.run()
    finally:
        handle.remove()
    return [(x, torch.softmax(x.double() @ router.weight.double().T, dim=-1)) for x in xs]


def _rowset(x: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(tuple(round(v, 4) for v in row[:4].tolist()) for row in x)


def _tensors(folder, part: str) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if part in k}


def test_an_expert_with_too_few_tokens_is_rounded_to_nearest_with_a_note(tiny_model, tmp_path):
    """``topk`` routing and a minimum no expert reaches: GPTQ rounds the attention, every expert
    falls back to round-to-nearest — the very bytes the ``rtn`` quantizer writes — and the run
    notes each expert by name; with ``all`` routing no expert falls back."""
    folder = tiny_model("mixtral")
    cal = {"n_samples": 2, "seq_len": 16}
    common = dict(calibrator_options=cal, progress=False, evaluators=[])
    few = qf.run(folder, quantizer="gptq", expert_routing="topk", expert_min_tokens=10**6, out=tmp_path / "few",
                 **common)
    qf.run(folder, quantizer="rtn", out=tmp_path / "rtn", **common)
    full = qf.run(folder, quantizer="gptq", expert_routing="all", expert_min_tokens=32, out=tmp_path / "all",
                  **common)
    notes = [n for n in few.manifest["notes"] if "calibration token(s)" in n]
    assert len(notes) == 2 * 4 and all("rounded to nearest, not by gptq" in n for n in notes)
    assert "model.layers.1.block_sparse_moe.experts.3 saw" in " ".join(notes)
    assert not any("calibration token(s)" in n for n in full.manifest["notes"])
    a, b, c = (_tensors(tmp_path / d, "experts") for d in ("few", "rtn", "all"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(c[k], b[k]) for k in c if k.endswith(".packed"))
    qa, qb = _tensors(tmp_path / "few", "q_proj"), _tensors(tmp_path / "rtn", "q_proj")
    assert any(not torch.equal(qa[k], qb[k]) for k in qa if k.endswith(".packed"))  # attention by GPTQ


def test_bad_routing_options_fail_before_any_work(tiny_model):
    folder = tiny_model("mixtral")
    with pytest.raises(UsageError, match="expert routing must be one of topk, fill, all"):
        qf.run(folder, expert_routing="some", progress=False)
    with pytest.raises(UsageError, match="expert_min_tokens must be >= 0"):
        qf.run(folder, expert_min_tokens=-1, progress=False)


def test_a_stage_of_many_experts_is_cut_by_the_statistics_budget(tiny_model):
    """``input_stages`` with a budget for one stage's float64 Grams: the experts' gate/up stage
    (with the attention's stages untouched) becomes stages of as many experts as fit, each
    expert whole (its gate and up read one input)."""
    from quantfoundry.toolkit import input_stages

    _stream, block = _first_block(tiny_model("qwen2_moe", dtype=torch.float32))
    linears = [n for n, m in block.module.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "mlp.shared_expert_gate"]
    block.formats = {n: qf.resolve_format("int4-g32") for n in linears}
    whole = input_stages(block)
    gram = 8 * 64 * 64  # hidden 64: one float64 Gram
    cut = input_stages(block, stats_budget=2 * gram + 2 * gram)  # the shared expert's gate/up + 2 experts
    assert sorted(map(sorted, whole)) != sorted(map(sorted, cut))
    assert sorted(n for s in cut for n in s) == sorted(n for s in whole for n in s)
    assert whole[:2] == cut[:2]  # q/k/v, o
    gate_up = [s for s in cut if any(n.endswith(("gate_proj", "up_proj")) for n in s)]
    assert [sorted({n.split(".")[2] for n in s if ".experts." in n}) for s in gate_up] == [["0", "1"], ["2", "3"]]
    assert all(f"mlp.experts.{e}.up_proj" in s for s in gate_up for e in {n.split(".")[2] for n in s
                                                                          if ".experts." in n})
    assert "mlp.shared_expert.gate_proj" in gate_up[0]
