"""Issue 16.8: a bad input is one line naming the file and the fix, and leaves nothing behind."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from click.testing import CliRunner
from quantfoundry.cli import cli
from quantfoundry.pipeline import artifact, journal


def run(*args: str) -> tuple[int, list[str]]:
    r = CliRunner().invoke(cli, ["run", "--no-progress", "--no-eval", *args])
    assert "Traceback" not in r.output
    return r.exit_code, [ln for ln in r.output.splitlines() if ln.strip()]


def nothing_beside(out) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_truncated_safetensors(tiny_model, tmp_path) -> None:
    model = tiny_model("llama")
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "o"
    code, lines = run("--model", str(model), "--out", str(out))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {weights} is damaged or truncated (") and lines[0].endswith("download it again")
    assert nothing_beside(out)


def test_config_that_is_not_json(tiny_model, tmp_path) -> None:
    model = tiny_model("llama")
    (model / "config.json").write_text((model / "config.json").read_text()[:-20])
    out = tmp_path / "o"
    code, lines = run("--model", str(model), "--out", str(out))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: {model / 'config.json'} is not valid JSON (")
    assert lines[0].endswith("fix it or download it again")
    assert nothing_beside(out)


def test_shard_named_by_the_index_is_missing(tiny_model, tmp_path) -> None:
    model = tiny_model("llama")
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}')
    code, lines = run("--model", str(model), "--out", str(tmp_path / "o"))
    assert code == 2 and "model-00001-of-00002.safetensors is missing" in lines[0], lines


def test_output_under_a_file(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    code, lines = run("--out", str(tmp_path / "afile" / "o"))
    assert code == 2 and lines == [f"Error: cannot write {tmp_path / 'afile' / 'o'}: {tmp_path / 'afile'} is a file, "
                                   "not a folder; choose another --out"]


def test_too_little_free_space_is_refused_before_work(tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(artifact.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1000))
    out = tmp_path / "o"
    code, lines = run("--model", str(tiny_model("llama")), "--out", str(out))
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"Error: the disk of {out} has 0 MiB free"), lines
    assert nothing_beside(out)


@pytest.mark.parametrize("after", [0, 1])
def test_disk_full_while_writing(tiny_model, tmp_path, monkeypatch, after) -> None:
    """The disk fills up after ``after`` journal blocks: one line, no temporary folder, and the
    finished blocks (if any) resume."""
    real = journal.Journal.write_block
    calls = []

    def write_block(self, index, record):  # noqa: ANN001, ANN202
        calls.append(index)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / "block-00001.safetensors"))
        return real(self, index, record)

    monkeypatch.setattr(journal.Journal, "write_block", write_block)
    model = tiny_model("llama")
    out = tmp_path / "o"
    code, lines = run("--model", str(model), "--out", str(out))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("Error: the output disk refused a write (No space left on device writing ")
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
    if not after:
        assert nothing_beside(out)
    else:
        assert "--resume" in lines[0]
        monkeypatch.setattr(journal.Journal, "write_block", real)
        code, lines = run("--model", str(model), "--out", str(out), "--resume")
        assert code == 0 and out.is_dir(), lines
