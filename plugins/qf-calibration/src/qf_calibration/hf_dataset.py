"""The ``hf-dataset`` calibrator: any dataset the ``datasets`` library opens.

``dataset`` is a Hugging Face Hub name (``wikitext``, with ``config=wikitext-2-raw-v1``), a
local data file (``.jsonl``/``.json``, ``.csv``, ``.parquet``, ``.txt``, ``.arrow``), a local
folder of data files, or a folder written by ``Dataset.save_to_disk``. By default it is
streamed: rows are read as they are used, so a large dataset is never downloaded or loaded
whole; a streamed shuffle draws from a buffer of ``shuffle_buffer`` rows (``datasets``' own
``IterableDataset.shuffle``: the same seed gives the same rows). ``column`` is a text column
(tokenized as a document, with the tokenizer's special tokens) or a messages column (rendered
with the chat template, as the ``chat`` calibrator does); by default ``messages`` if the
dataset has it, else ``text``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import quantfoundry as qf
from quantfoundry.errors import UsageError

from .conversations import ChatOptions, Renderer, conversation
from .sampling import SamplingOptions, assemble

#: data file suffix -> the ``datasets`` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
            ".arrow": "arrow"}


@dataclass(frozen=True, kw_only=True)
class HFDatasetOptions(SamplingOptions, ChatOptions):
    dataset: str = field(default="", metadata={
        "help": "a Hub dataset name, a local data file (.jsonl .json .csv .parquet .txt .arrow) or folder"})
    config: str | None = field(default=None, metadata={"help": "the dataset's configuration name (Hub)"})
    split: str = field(default="train", metadata={"help": "the split to read"})
    revision: str | None = field(default=None, metadata={"help": "the Hub revision (branch, tag or commit)"})
    column: str | None = field(default=None, metadata={
        "help": "a text column, or a messages column (rendered with the chat template); default: messages, else text"})
    streaming: bool = field(default=True, metadata={"help": "read rows as they are used (never the whole dataset)"})
    shuffle: bool = field(default=True, metadata={"help": "draw rows in an order from seed (streamed: from a buffer)"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "rows in a streamed shuffle's buffer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.dataset:
            raise ValueError("dataset is required: a Hub name or a local file/folder (--calibrator-opt dataset=...)")
        local = Path(self.dataset).expanduser()
        if _looks_local(self.dataset) and not local.exists():
            raise ValueError(f"dataset {self.dataset} does not exist; pass an existing file or folder, or a Hub name")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")


def _looks_local(name: str) -> bool:
    """A path rather than a Hub name: it exists, starts like a path, or ends like a data file."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
            or Path(name).suffix.lower() in BUILDERS or name.count("/") > 1)


def open_dataset(o: HFDatasetOptions) -> Any:
    """The split, as an ``IterableDataset`` (streaming) or ``Dataset``; one-line errors."""
    try:
        import datasets
    except ImportError:
        raise UsageError("hf-dataset needs the datasets library: pip install datasets") from None
    datasets.disable_progress_bars()
    path = Path(o.dataset).expanduser()
    try:
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UsageError(f"dataset file {path}: unknown kind; use one of {', '.join(BUILDERS)}")
            if o.split != "train":
                raise UsageError(f"a single data file has one split, 'train'; drop split={o.split}")
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=o.streaming)
        if path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))  # one split written by save_to_disk
            return ds.to_iterable_dataset() if o.streaming else ds
        return datasets.load_dataset(str(path) if path.is_dir() else o.dataset, o.config, split=o.split,
                                     streaming=o.streaming, revision=o.revision)
    except UsageError:
        raise
    except Exception as exc:  # the Hub, the file readers and pyarrow raise many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"cannot open dataset {o.dataset} (split {o.split}): {first}") from None


def _rows(ds: Any, where: str) -> Iterator[dict[str, Any]]:
    """The rows of ``ds``; a row the library cannot read (a streamed file broken further down) is one line."""
    it = iter(ds)
    i = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as exc:  # datasets/pyarrow raise many kinds while reading a file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"cannot read {where} after row {i}: {first}") from None
        yield row
        i += 1


def _columns(ds: Any, where: str) -> list[str]:
    """The dataset's column names (a streamed dataset whose features are not declared: its first row's keys)."""
    columns = getattr(ds, "column_names", None)
    if columns:
        return list(columns)
    for row in _rows(ds.take(1), where):
        return list(row)
    raise UsageError(f"{where} has no rows")


class HFDatasetCalibrator(qf.Calibrator):
    name = "hf-dataset"
    description = "a Hugging Face dataset (Hub or local files), streamed; text or chat messages"
    Options = HFDatasetOptions

    options: HFDatasetOptions

    def load(self, tokenizer: Any) -> qf.CalibrationSet:
        o = self.options
        ds = open_dataset(o)
        where = f"dataset {o.dataset} (split {o.split})"
        columns = _columns(ds, where)
        column = o.column or ("messages" if "messages" in columns else "text" if "text" in columns else None)
        if column is None or column not in columns:
            raise UsageError(f"dataset {o.dataset} has no column {column or 'messages or text'!r}; its columns: "
                             f"{', '.join(columns) or 'unknown'} (choose one with --calibrator-opt column=NAME)")
        if o.shuffle:
            ds = ds.shuffle(seed=o.seed, buffer_size=o.shuffle_buffer) if o.streaming else ds.shuffle(seed=o.seed)
        renderer: Renderer | None = None

        def documents() -> Iterator[tuple[str, list[int]]]:
            nonlocal renderer
            for i, row in enumerate(_rows(ds, where)):
                value = row.get(column) if isinstance(row, dict) else None
                if isinstance(value, str):
                    if value.strip():
                        yield value, list(tokenizer(value, verbose=False).input_ids)
                elif isinstance(value, list):
                    if renderer is None:
                        renderer = Renderer(tokenizer, o, owner="calibrator 'hf-dataset'")
                    text = renderer.render(conversation({"messages": value}, f"{where} row {i}"), f"{where} row {i}")
                    if text is not None:
                        yield text, renderer.tokenize(text)
                elif value is not None:
                    raise UsageError(f"{where} row {i}: column {column!r} holds {type(value).__name__}, neither text "
                                     "nor a messages list")

        name = o.dataset + (f" ({o.config})" if o.config else "") + f", split {o.split}, column {column}"
        return assemble(documents(), o, source=name, eos_id=tokenizer.eos_token_id,
                        info={"streaming": o.streaming, "shuffle": o.shuffle})
