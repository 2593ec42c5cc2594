"""llama.cpp as the engine that serves a GGUF artifact, through llama-cpp-python.

``qf eval`` and the artifact check of ``qf run --exporter gguf`` measure the file as llama.cpp
computes it: next-token logits for every position (``logits``), llama.cpp's own tokenizer
(``tokenize``, compared with the source tokenizer by the run), and greedy generation that stops
at an end-of-generation token (``generate``).

llama-cpp-python bundles a libllama; ``LLAMA_CPP_LIB_PATH`` points it at another one (CI
installs the package without compiling and uses the libllama that
``../shared/tools/build-llama-cpp.sh`` built).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from quantfoundry import Engine
from quantfoundry.errors import ArtifactError, EngineUnavailable

INSTALL = "pip install 'qf-gguf[engine]' (llama-cpp-python)"


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or :class:`EngineUnavailable` saying how to get it."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise EngineUnavailable(f"llama-cpp-python is not installed: {INSTALL} to run GGUF files "
                                "in llama.cpp") from None
    except (OSError, RuntimeError) as e:  # FileNotFoundError: no libllama where it looked
        raise EngineUnavailable(f"llama-cpp-python cannot load libllama ({e}); reinstall it, or set "
                                "LLAMA_CPP_LIB_PATH to a folder holding libllama.so") from None
    return llama_cpp


class LlamaCppEngine(Engine):
    """One GGUF file loaded by llama.cpp. The context is sized to the longest sequence asked
    for (re-created when a longer one comes) and evaluates a whole sequence in one batch."""

    name = "llama.cpp"
    #: llama.cpp's CPU matmuls quantize the activations to 8 bits (Q8_0 / Q8_K blocks) before
    #: every product with a quantized weight; that moves the figures as much as 8-bit weights
    #: do: on SmolLM2-135M Q8_0 (WikiText) KL to the original is 0.0046 through llama.cpp and
    #: 0.0013 for the exact dequantized model (a torch simulation of the activation rounding
    #: gives 0.0046 too); through F32 weights llama.cpp and transformers agree to KL 1e-6.
    agreement = {"kl_mean": (0.15, 0.006), "same_top1_pct": (0.0, 2.0), "perplexity": (0.02, 0.0)}

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", *, threads: int | None = None,
                 n_ctx: int = 512) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path} does not exist; export it again")
        self._lib = import_llama_cpp()
        self.device = torch.device(device)
        self.offload = self.device.type == "cuda" and bool(self._lib.llama_supports_gpu_offload())
        self.version = f"llama-cpp-python {self._lib.__version__} ({'GPU offload' if self.offload else 'CPU'})"
        self._threads = threads or max(torch.get_num_threads(), 1)
        self._llm: Any = None
        self._n_ctx = 0
        self._open(n_ctx)

    def _open(self, n_ctx: int) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
        try:
            self._llm = self._lib.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_gpu_layers=-1 if self.offload else 0, n_threads=self._threads,
                n_threads_batch=self._threads, seed=0, verbose=False)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise ArtifactError(f"llama.cpp cannot load {self.path} ({e}); the file is damaged or was "
                                "written for another llama.cpp version") from None
        self._n_ctx = n_ctx
        self._vocab = self._lib.llama_model_get_vocab(self._llm.model)

    def _fit(self, n_tokens: int) -> None:
        if n_tokens > self._n_ctx:
            self._open(-(-n_tokens // 256) * 256)

    @property
    def n_vocab(self) -> int:
        return int(self._llm.n_vocab())

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF's key/values as llama.cpp read them."""
        return dict(self._llm.metadata)

    def _eval(self, ids: list[int]) -> None:
        self._llm.reset()  # the next eval drops the whole KV cache
        self._llm.eval(ids)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, n = input_ids.shape
        self._fit(n)
        out = torch.empty(batch, n, self.n_vocab, dtype=torch.float32)
        for b in range(batch):
            self._eval([int(t) for t in input_ids[b]])
            out[b] = torch.from_numpy(np.array(self._llm.scores[:n], dtype=np.float32))
        return out

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True adds what the file's tokenizer.ggml.add_bos/eos_token say, as
        # transformers' add_special_tokens=True does; special=True parses special-token text
        return [int(t) for t in self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)]

    def is_eog(self, token: int) -> bool:
        """True for an end-of-generation token (EOS, EOT, ``<|im_end|>``, ...) of the file."""
        return bool(self._lib.llama_vocab_is_eog(self._vocab, int(token)))

    def generate(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``input_ids``: the new tokens, ending with the end-of-generation
        token when one comes before ``max_new_tokens``."""
        self._fit(len(input_ids) + max_new_tokens)
        self._eval(list(input_ids))
        new: list[int] = []
        while len(new) < max_new_tokens:
            token = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
            new.append(token)
            if self.is_eog(token):
                break
            self._llm.eval([token])
        return new

    def artifact_bytes(self) -> int:
        return self.path.stat().st_size

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
