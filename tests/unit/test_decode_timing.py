"""Timed decoding (``quantfoundry.evaluation.decode``): every mode decodes the same greedy tokens
as a plain loop of full forwards without any cache — the independent reference."""

from __future__ import annotations

import pytest
import torch
from quantfoundry.evaluation.decode import resolve_mode, time_decode
from quantfoundry.testing import build_tiny_model
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", "llama")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    ids = prompt
    for _ in range(steps):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.shape[1]:]


@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_modes_decode_the_greedy_tokens(model: torch.nn.Module, mode: str, batch: int) -> None:
    prompt = torch.randint(0, model.config.vocab_size, (batch, 7), generator=torch.Generator().manual_seed(batch))
    t = time_decode(model, prompt, 6, mode=mode, repeats=2, warmup=1)
    assert t.mode == mode and t.tokens_per_s > 0
    # the first decoded token is the prefill's argmax, each step's token feeds the next
    expected = greedy_without_cache(model, prompt, 6)
    assert torch.equal(t.tokens, expected)


def test_modes_resolve_by_device() -> None:
    assert resolve_mode("auto", torch.device("cpu")) == "eager"
    assert resolve_mode("auto", torch.device("cuda")) == "graph"
    with pytest.raises(ValueError, match="one of auto, eager, static, graph"):
        resolve_mode("fast", torch.device("cpu"))


def test_graph_mode_needs_cuda(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        time_decode(model, torch.zeros(1, 4, dtype=torch.long), 2, mode="graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_mode_decodes_the_greedy_tokens_on_cuda(model: torch.nn.Module) -> None:
    m = model.to("cuda")
    try:
        prompt = torch.randint(0, m.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).cuda()
        t = time_decode(m, prompt, 6, mode="graph", repeats=2, warmup=1)
        assert t.mode == "graph"
        assert torch.equal(t.tokens, greedy_without_cache(m, prompt, 6))
    finally:
        model.to("cpu")
