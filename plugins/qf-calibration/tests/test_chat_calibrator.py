"""The ``chat`` calibrator: conversations rendered exactly as the model's chat template renders
them (checked against ChatML written out by hand), one per sequence or packed, reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from calib_data import CHATML, CHATS
from qf_calibration.chat import ChatCalibrator
from quantfoundry.errors import OptionsError, UsageError
from quantfoundry.options import parse_options

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(**options) -> ChatCalibrator:
    return ChatCalibrator(parse_options(ChatCalibrator.Options, options, owner="calibrator 'chat'"))


def chatml(messages: list[tuple[str, str]], generation_prompt: bool = False) -> str:
    """SmolLM2's ChatML, written out (its template adds its own system message when none is given)."""
    if messages[0][0] != "system":
        messages = [("system", SMOL_SYSTEM), *messages]
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_each_conversation_is_rendered_with_the_models_template(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"messages": [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "4."}]},
                  {"prompt": "Name a prime.", "response": "7", "system": "Be brief."}])
    cal = chat(path=path, n_samples=2, seq_len=512).load(smol_tokenizer)
    want = {tuple(ids(smol_tokenizer, chatml([("user", "What is 2+2?"), ("assistant", "4.")])) ),
            tuple(ids(smol_tokenizer, chatml([("system", "Be brief."), ("user", "Name a prime."), ("assistant", "7")])))}
    got = {tuple(s.tolist()) for s in cal.samples()}
    assert got == want
    im_start = smol_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(s[0] == im_start for s in cal.samples())  # special tokens as tokens, not as text
    assert cal.lengths is not None and cal.n_tokens == sum(len(w) for w in want)


def test_system_prompt_and_prompt_only_rendering(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}]}])
    with_system = chat(path=path, n_samples=1, system_prompt="You write Python.").load(smol_tokenizer)
    assert with_system.samples()[0].tolist() == ids(smol_tokenizer, chatml(
        [("system", "You write Python."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
         ("assistant", "Bye!")]))
    prompt_only = chat(path=path, n_samples=1, include_assistant=False).load(smol_tokenizer)
    assert prompt_only.samples()[0].tolist() == ids(smol_tokenizer, chatml(
        [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")], generation_prompt=True))
    no_header = chat(path=path, n_samples=1, include_assistant=False, add_generation_prompt=False).load(smol_tokenizer)
    assert no_header.samples()[0].tolist() == ids(smol_tokenizer, chatml(
        [("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")]))


def test_same_seed_same_ids_other_seed_other_order(smol_tokenizer) -> None:
    a = chat(path=CHATS, n_samples=16, seq_len=256, seed=3).load(smol_tokenizer)
    b = chat(path=CHATS, n_samples=16, seq_len=256, seed=3).load(smol_tokenizer)
    c = chat(path=CHATS, n_samples=16, seq_len=256, seed=4).load(smol_tokenizer)
    assert torch.equal(a.input_ids, b.input_ids) and a.ids_sha256 == b.ids_sha256 and a.sha256 == b.sha256
    assert a.ids_sha256 != c.ids_sha256
    assert int(a.sample_lengths().max()) <= 256 and a.n_samples == 16


def test_the_order_is_the_seeded_permutation_of_the_file(smol_tokenizer) -> None:
    records = [json.loads(line) for line in CHATS.read_text().splitlines()]
    cal = chat(path=CHATS, n_samples=5, seq_len=4096, seed=11).load(smol_tokenizer)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(11)).tolist()[:5]
    for sample, index in zip(cal.samples(), order, strict=True):
        messages = [(m["role"], m["content"]) for m in records[index]["messages"]]
        assert sample.tolist() == ids(smol_tokenizer, chatml(messages))[:4096]


def test_packing_joins_the_rendered_conversations_into_full_windows(smol_tokenizer) -> None:
    records = [json.loads(line) for line in CHATS.read_text().splitlines()]
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
    stream: list[int] = []
    eos = smol_tokenizer.eos_token_id
    for index in order[:40]:
        doc = ids(smol_tokenizer, chatml([(m["role"], m["content"]) for m in records[index]["messages"]]))
        stream += doc + ([eos] if doc[-1] != eos else [])
    cal = chat(path=CHATS, n_samples=6, seq_len=128, packing=True).load(smol_tokenizer)
    assert cal.uniform and tuple(cal.input_ids.shape) == (6, 128)
    assert cal.input_ids.flatten().tolist() == stream[: 6 * 128]
    assert cal.info["packing"] is True


def test_too_few_conversations_is_a_warning_with_the_count(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"prompt": "a", "response": "b"}] * 3)
    cal = chat(path=path, n_samples=10).load(smol_tokenizer)
    assert cal.n_samples == 3
    assert any("3 sequences, fewer than the 10 asked" in w for w in cal.info["warnings"])


def test_a_model_without_a_chat_template_is_refused_with_the_option_to_pass(pycode_tokenizer) -> None:
    with pytest.raises(UsageError, match="no chat template; pass one with --calibrator-opt chat_template=FILE.jinja"):
        chat(path=CHATS, n_samples=2).load(pycode_tokenizer)
    cal = chat(path=CHATS, n_samples=2, chat_template=CHATML).load(pycode_tokenizer)
    first = json.loads(CHATS.read_text().splitlines()[0])  # any sample: check the shape of the text
    text = pycode_tokenizer.decode(cal.samples()[0])
    assert text.startswith("<|im_start|>") and "<|im_end|>" in text and first


@pytest.mark.parametrize(("line", "message"), [
    ("not json", ":2 is not valid JSON"),
    ('{"text": "plain"}', ":2 is no conversation"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', ":2: message 0 must be"),
    ('{"messages": []}', ":2: 'messages' must be a non-empty list"),
])
def test_bad_lines_name_the_file_and_line(smol_tokenizer, tmp_path, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "response": "ok"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message):
        chat(path=path).load(smol_tokenizer)


def test_options_are_checked_before_any_work(tmp_path) -> None:
    with pytest.raises(OptionsError, match="path is required"):
        chat()
    with pytest.raises(OptionsError, match="does not exist"):
        chat(path=tmp_path / "missing.jsonl")
    with pytest.raises(OptionsError, match="n_samples must be >= 1"):
        chat(path=CHATS, n_samples=0)


@pytest.mark.parametrize("quantizer", ["gptq", "awq"])
def test_gptq_and_awq_calibrate_on_conversations_of_several_lengths(quantizer, tiny_model, pycode_tokenizer,
                                                                     tmp_path) -> None:
    import quantfoundry as qf

    options = {"path": str(CHATS), "chat_template": str(CHATML), "n_samples": 8, "seq_len": 768}
    r = qf.run(str(tiny_model("llama")), quantizer=quantizer, format="int4-g32", calibrator="chat",
               calibrator_options=options, evaluators=[("kl", {"max_tokens": "1024"})], out=tmp_path / "o",
               progress=False)
    assert not [n for n in r.notes if n.startswith("MISMATCH")]
    assert 0 < r.metrics["kl"]["kl_mean"]["quantized"] < float("inf")
    cal = chat(**options).load(pycode_tokenizer)
    recorded = r.manifest["calibration"]
    assert cal.lengths is not None and len(set(cal.lengths.tolist())) > 1  # really several lengths
    assert recorded["ids_sha256"] == cal.ids_sha256 and recorded["tokens"] == cal.n_tokens
    assert recorded["samples"] == 8 and recorded["source"] == str(CHATS)


def test_qf_calib_shows_the_rendered_conversations(shared) -> None:
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    model = shared / "models" / "smollm2-135m-instruct-q4_1-dequant"  # tokenizer only: no weights there
    r = CliRunner().invoke(cli, ["calib", "--model", str(model), "--calibrator", "chat", "--calibrator-opt",
                                 f"path={CHATS}", "--calibrator-opt", "n_samples=12", "--show", "2"])
    assert r.exit_code == 0, r.output
    assert "calibrator: chat (qf-calibration 0.1.0)" in r.output and "(one document per sequence)" in r.output
    assert "--- sample 1 of 12" in r.output and "--- sample 2 of 12" in r.output
    assert "<|im_start|>user\n" in r.output and "<|im_end|>" in r.output
