"""The ``mix`` calibrator: the weights split the samples (largest remainder), each part is the
calibrator it names with its own options, and a recipe drives it end to end."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from calib_data import CHATML, CHATS
from click.testing import CliRunner
from qf_calibration.chat import ChatCalibrator
from qf_calibration.mix import MixCalibrator, shares
from quantfoundry.cli import cli
from quantfoundry.errors import OptionsError, UsageError
from quantfoundry.options import parse_options


def mix(**options) -> MixCalibrator:
    return MixCalibrator(parse_options(MixCalibrator.Options, options, owner="calibrator 'mix'"))


@pytest.mark.parametrize(("weights", "total", "want"), [
    ([0.7, 0.3], 10, [7, 3]),
    ([1, 1, 1], 10, [4, 3, 3]),          # the largest remainder goes first (all equal: the first part)
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),     # exact 3.5, 2.1, 1.4: the .5 remainder wins the spare sample
    ([100, 1], 3, [2, 1]),               # every part keeps at least one sample
])
def test_shares(weights, total, want) -> None:
    assert shares(weights, total) == want


def test_parts_are_their_own_calibrators_with_their_share(smol_tokenizer) -> None:
    parts = ({"name": "chat", "weight": 0.7, "path": str(CHATS)}, {"name": "text", "weight": 0.3, "seq_len": 64})
    cal = mix(parts=parts, n_samples=10, seq_len=256, seed=2).load(smol_tokenizer)
    alone_chat = ChatCalibrator(parse_options(ChatCalibrator.Options, {"path": str(CHATS), "n_samples": "7",
                                                                        "seq_len": "256", "seed": "2"}))
    from quantfoundry.plugins import get_component

    text_cls = get_component("calibrator", "text")
    alone_text = text_cls(parse_options(text_cls.Options, {"n_samples": "3", "seq_len": "64", "seed": "3"}))
    want = Counter(tuple(s.tolist()) for c in (alone_chat, alone_text) for s in c.load(smol_tokenizer).samples())
    assert Counter(tuple(s.tolist()) for s in cal.samples()) == want
    parts_info = {p["name"]: p for p in cal.info["parts"]}
    assert parts_info["chat"]["samples"] == 7 and parts_info["text"]["samples"] == 3
    assert parts_info["text"]["tokens"] == 3 * 64
    assert abs(sum(p["token_share"] for p in parts_info.values()) - 1) < 1e-3
    again = mix(parts=parts, n_samples=10, seq_len=256, seed=2).load(smol_tokenizer)
    assert torch.equal(again.input_ids, cal.input_ids) and again.ids_sha256 == cal.ids_sha256


def test_command_line_parts_and_errors(smol_tokenizer, tmp_path) -> None:
    cal = mix(parts="text:1,text:3", n_samples=8, seq_len=32).load(smol_tokenizer)
    assert [p["samples"] for p in cal.info["parts"]] == [2, 6]
    with pytest.raises(OptionsError, match="parts is required"):
        mix()
    with pytest.raises(UsageError, match="unknown calibrator 'nope'"):
        mix(parts="nope:1")
    with pytest.raises(UsageError, match="weight must be > 0"):
        mix(parts="text:0")
    with pytest.raises(OptionsError, match=r"part 1 \(chat\).*does not exist"):
        mix(parts=({"name": "text"}, {"name": "chat", "path": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(OptionsError, match=r"unknown option 'colour' for calibrator 'mix' part 0 \(text\)"):
        mix(parts=({"name": "text", "colour": "red"},))
    with pytest.raises(UsageError, match="drop n_samples, the weights set it"):
        mix(parts=({"name": "text", "n_samples": 3},))


def test_a_recipe_previews_and_runs_a_mix(shared, tmp_path, tiny_model) -> None:
    recipe = tmp_path / "mix.toml"
    recipe.write_text(f'''
model = "{shared / 'models' / 'smollm2-135m-instruct-q4_1-dequant'}"

[calibrator]
name = "mix"
n_samples = 6
seq_len = 128

[[calibrator.parts]]
name = "chat"
weight = 2
path = "{CHATS}"
chat_template = "{CHATML}"

[[calibrator.parts]]
name = "text"
weight = 1
''')
    r = CliRunner().invoke(cli, ["calib", "--recipe", str(recipe)])
    assert r.exit_code == 0, r.output
    assert "part chat (weight 2): 4 samples" in r.output and "part text (weight 1): 2 samples" in r.output
    assert "--- sample 1 of 6" in r.output
    # the same recipe quantizes a tiny model with GPTQ (samples of several lengths, unpadded; the tiny
    # model has pycode-7m's tokenizer, which has no chat template: the part brings one)
    folder = tiny_model("llama")
    r = CliRunner().invoke(cli, ["run", "--recipe", str(recipe), "--model", str(folder), "--quantizer", "gptq",
                                 "--format", "int4-g32", "--no-eval", "--no-progress", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
