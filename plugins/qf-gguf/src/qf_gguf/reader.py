"""A second, independent reader of GGUF files that needs no compiler: transformers' GGUF loader.

When llama-cpp-python is missing (or cannot load its libllama), ``qf run --exporter gguf`` and
``qf eval`` still check the written file: transformers reads it with gguf-py's dequantizers
into the original Hugging Face architecture (each block type decoded by gguf-py's numpy code,
not ours) and builds the tokenizer from the file's own vocabulary. The figures are those of the
exact dequantized model (llama.cpp would also round the activations to 8 bits), so the artifact
check holds it to the in-memory model's own bounds. A file transformers reads only in part (a
Mixtral GGUF, which llama.cpp writes as "llama" with experts, becomes a dense llama without its
MLPs) is no check: the reader refuses it, naming the weights it left out. llama.cpp stays the
preferred engine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from quantfoundry import Engine
from quantfoundry.errors import ArtifactError, EngineUnavailable


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or info lines from transformers while it reads the file."""
    from transformers.utils import logging

    bars = logging.is_progress_bar_enabled()
    level = logging.get_verbosity()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF loader's own tqdm bar
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env


class TransformersGGUFEngine(Engine):
    """One GGUF file dequantized by transformers (gguf-py) into a float32 torch model."""

    name = "transformers GGUF reader"

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", *, instead_of: str = "") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} does not exist; export it again")
        self.device = torch.device(device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with _quiet():
                self._model, info = AutoModelForCausalLM.from_pretrained(
                    str(self.path.parent), gguf_file=self.path.name, dtype=torch.float32, output_loading_info=True)
                self._model = self._model.to(self.device).eval()
                self._tokenizer: Any = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as exc:  # noqa: BLE001 - an architecture or type transformers cannot read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineUnavailable(f"{instead_of + '; ' if instead_of else ''}transformers cannot read "
                                    f"{self.path.name} either ({first})") from None
        missing = sorted(info["missing_keys"])
        if missing:  # e.g. Mixtral, which llama.cpp writes as "llama" with experts: read as a dense llama
            model_type = self._model.config.model_type
            self._model = None
            raise EngineUnavailable(f"{instead_of + '; ' if instead_of else ''}transformers reads {self.path.name} "
                                    f"as a {model_type!r} model without {len(missing)} of its weights "
                                    f"({missing[0]}, ...), so it cannot check it")
        why = f"; llama.cpp not used: {instead_of}" if instead_of else ""
        self.version = f"transformers {version('transformers')}, gguf {version('gguf')}{why}"

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._model(input_ids.to(self.device)).logits.float()

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer(text, add_special_tokens=True).input_ids]

    def artifact_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        self._model = None

