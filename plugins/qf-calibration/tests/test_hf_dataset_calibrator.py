"""The ``hf-dataset`` calibrator over local data (the Hub path is the same ``load_dataset`` call):
rows in the order ``datasets`` itself gives for the seed, text and messages columns, streaming
that reads only the rows it uses, and one-line errors."""

from __future__ import annotations

import datasets
import pytest
import torch
from calib_data import CHATML, CHATS
from qf_calibration.chat import ChatCalibrator
from qf_calibration.hf_dataset import HFDatasetCalibrator
from quantfoundry.errors import OptionsError, UsageError
from quantfoundry.options import parse_options

TEXTS = [f"Row {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 3)) for i in range(40)]


def hf(**options) -> HFDatasetCalibrator:
    return HFDatasetCalibrator(parse_options(HFDatasetCalibrator.Options, options, owner="calibrator 'hf-dataset'"))


def test_text_rows_in_the_order_datasets_shuffles_them(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"text": t, "n": i} for i, t in enumerate(TEXTS)])
    cal = hf(dataset=str(path), streaming=False, seed=5, n_samples=8, seq_len=64).load(smol_tokenizer)
    reference = datasets.load_dataset("json", data_files=str(path), split="train").shuffle(seed=5)
    want = [smol_tokenizer(t).input_ids[:64] for t in reference["text"][:8]]
    assert [s.tolist() for s in cal.samples()] == want
    streamed = hf(dataset=str(path), seed=5, shuffle_buffer=16, n_samples=8, seq_len=64).load(smol_tokenizer)
    reference = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    rows = list(reference.shuffle(seed=5, buffer_size=16).take(8))
    assert [s.tolist() for s in streamed.samples()] == [smol_tokenizer(r["text"]).input_ids[:64] for r in rows]


def test_unshuffled_rows_come_in_file_order_and_seeds_reproduce(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"text": t} for t in TEXTS])
    plain = hf(dataset=str(path), shuffle=False, n_samples=4, seq_len=64).load(smol_tokenizer)
    assert [s.tolist() for s in plain.samples()] == [smol_tokenizer(t).input_ids for t in TEXTS[:4]]
    a = hf(dataset=str(path), seed=1, n_samples=6).load(smol_tokenizer)
    b = hf(dataset=str(path), seed=1, n_samples=6).load(smol_tokenizer)
    c = hf(dataset=str(path), seed=2, n_samples=6).load(smol_tokenizer)
    assert torch.equal(a.input_ids, b.input_ids) and a.ids_sha256 == b.ids_sha256 != c.ids_sha256


def test_a_messages_column_is_rendered_as_the_chat_calibrator_renders_it(smol_tokenizer) -> None:
    got = hf(dataset=str(CHATS), shuffle=False, n_samples=5, seq_len=4096).load(smol_tokenizer)
    assert "column messages" in got.source
    records = datasets.load_dataset("json", data_files=str(CHATS), split="train")["messages"][:5]
    want = [smol_tokenizer.apply_chat_template(m, tokenize=False) for m in records]
    assert [s.tolist() for s in got.samples()] == [smol_tokenizer(w, add_special_tokens=False).input_ids for w in want]
    chat = ChatCalibrator(parse_options(ChatCalibrator.Options, {"path": str(CHATS), "n_samples": "400",
                                                                  "seq_len": "4096"}))
    everything = {tuple(s.tolist()) for s in chat.load(smol_tokenizer).samples()}
    assert all(tuple(s.tolist()) in everything for s in got.samples())


def test_packed_rows(smol_tokenizer, jsonl) -> None:
    path = jsonl([{"text": t} for t in TEXTS])
    cal = hf(dataset=str(path), shuffle=False, packing=True, n_samples=3, seq_len=32).load(smol_tokenizer)
    stream: list[int] = []
    for t in TEXTS:
        stream += smol_tokenizer(t).input_ids + [smol_tokenizer.eos_token_id]
    assert cal.uniform and cal.input_ids.flatten().tolist() == stream[:96]


def test_streaming_reads_only_the_rows_it_uses(smol_tokenizer, tmp_path) -> None:
    """A broken second shard is never read when streaming the first rows (loading the split reads it)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train-00000-of-00002.jsonl").write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(50)))
    (folder / "train-00001-of-00002.jsonl").write_text('{"text": "fine"}\n{broken\n')
    cal = hf(dataset=str(folder), shuffle=False, n_samples=3).load(smol_tokenizer)
    assert [s.tolist() for s in cal.samples()] == [smol_tokenizer(f"row {i}").input_ids for i in range(3)]
    with pytest.raises(UsageError, match="cannot read dataset .* after row 50"):
        hf(dataset=str(folder), shuffle=False, n_samples=60).load(smol_tokenizer)
    with pytest.raises(UsageError, match="cannot open dataset"):
        hf(dataset=str(folder), streaming=False, n_samples=3).load(smol_tokenizer)


def test_parquet_files_folders_and_saved_datasets(smol_tokenizer, tmp_path) -> None:
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    ds.to_json(str(folder / "train.jsonl"))
    ds.save_to_disk(str(tmp_path / "saved"))
    want = [smol_tokenizer(t).input_ids for t in TEXTS[:3]]
    for where in (tmp_path / "rows.parquet", folder, tmp_path / "saved"):
        for streaming in (True, False):
            cal = hf(dataset=str(where), shuffle=False, streaming=streaming, n_samples=3).load(smol_tokenizer)
            assert [s.tolist() for s in cal.samples()] == want, (where, streaming)


def test_errors_are_one_line_and_name_the_fix(smol_tokenizer, pycode_tokenizer, jsonl, tmp_path) -> None:
    path = jsonl([{"body": t} for t in TEXTS])
    with pytest.raises(UsageError, match="has no column 'messages or text'; its columns: body"):
        hf(dataset=str(path)).load(smol_tokenizer)
    with pytest.raises(UsageError, match="has no column 'prose'"):
        hf(dataset=str(path), column="prose").load(smol_tokenizer)
    assert hf(dataset=str(path), column="body", n_samples=2).load(smol_tokenizer).n_samples == 2
    with pytest.raises(UsageError, match="one split, 'train'"):
        hf(dataset=str(path), split="test").load(smol_tokenizer)
    with pytest.raises(OptionsError, match="does not exist"):
        hf(dataset=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(OptionsError, match="dataset is required"):
        hf()
    with pytest.raises(UsageError, match="no chat template; pass one with --calibrator-opt chat_template"):
        hf(dataset=str(CHATS), n_samples=2).load(pycode_tokenizer)
    assert hf(dataset=str(CHATS), n_samples=2, chat_template=str(CHATML)).load(pycode_tokenizer).n_samples == 2
