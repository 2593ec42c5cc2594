"""``qf new-plugin NAME --role ROLE``: an installable plugin package whose own tests pass as
generated — a working component of the role (small, but real), its entry point, the
conformance kit's checks for the role and one test of its behaviour.

The templates are plain text with ``{dist}`` (the distribution name), ``{pkg}`` (the import
package), ``{name}`` (the component's name) and ``{cls}`` (its class) filled in.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UsageError

ROLES = ("quantizer", "format", "exporter", "evaluator", "calibrator", "kernel")

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A QuantFoundry {role}: {name}"
requires-python = ">=3.11"
dependencies = ["quantfoundry>=0.1,<0.2"]

[project.optional-dependencies]
testing = ["pytest>=8"]

[project.entry-points.quantfoundry]
{name} = "{pkg}"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''\
# {dist}

A QuantFoundry {role}, `{name}`, made by `qf new-plugin`. Install it and run its tests:

```
pip install -e "{dist}[testing]"
python -m pytest {dist}
qf plugins                      # lists {name} from {dist} 0.1.0
```

Then replace the starting implementation in `src/{pkg}/__init__.py` with yours; the tests
(`tests/`) include the core's conformance checks for a {role}. docs/writing-a-plugin.md and
docs/lifecycle.md in the QuantFoundry repository say what each method receives and when it is
called.
'''

CONFTEST = '''\
pytest_plugins = ["quantfoundry.testing"]  # fixtures: tiny_model, register_plugin, qf_plugin_manager
'''

MODULES = {
    "quantizer": '''\
"""{dist}: the quantizer ``{name}``.

A starting point made by ``qf new-plugin``: round to nearest on the planned format after
shrinking the weights by ``shrink`` (1 = plain RTN), fitted with the importance matrix when the
run has one (``--imatrix``). Replace ``quantize_tensor`` with your method and keep the
contract: return the planned format, the weight's shape and its checkpoint dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import quantfoundry as qf
import torch
from quantfoundry import hookimpl


@dataclass(frozen=True, kw_only=True)
class {cls}Options(qf.Options):
    shrink: float = field(default=1.0, metadata={{"help": "scale the weights by this before fitting the grid"}})

    def __post_init__(self) -> None:
        if not 0 < self.shrink <= 1:
            raise ValueError(f"shrink must be in (0, 1], got {{self.shrink}}")


class {cls}(qf.Quantizer):
    name = "{name}"
    description = "round to nearest after shrinking the weights (a qf new-plugin starting point)"
    Options = {cls}Options
    scope = "tensor"

    options: {cls}Options

    def quantize_tensor(self, name: str, weight: torch.Tensor, fmt: qf.Format, ctx: qf.QuantContext
                        ) -> qf.QuantizedWeight:
        w = weight.to(ctx.device, torch.float32)
        params = fmt.fit(w * self.options.shrink, ctx.importance.get(name))
        return qf.QuantizedWeight(fmt, tuple(w.shape), weight.dtype, fmt.pack(fmt.round(w, params)), params)


@hookimpl
def qf_register_quantizers(register):
    register({cls})
''',
    "format": '''\
"""{dist}: the format ``{name}``.

A starting point made by ``qf new-plugin``: a symmetric grid of ``bits``-bit codes, one
float16 scale per group of ``group`` input columns (``scale = absmax / (2^(bits−1) − 1)``),
codes stored offset by ``2^(bits−1)``. Spec: ``{name}`` or ``{name}-b<bits>-g<group>``.
Replace ``fit``/``round``/``decode`` with your grid; keep their contracts (docs/lifecycle.md):
parameters already in their storage dtype, ``round`` and ``decode`` of a column slice equal to
those of the whole tile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import quantfoundry as qf
import torch
from quantfoundry import hookimpl


@dataclass(frozen=True, kw_only=True)
class {cls}Options(qf.Options):
    bits: int = field(default=4, metadata={{"help": "bits per code, 2-8"}})
    group: int = field(default=32, metadata={{"help": "input columns per scale (a power of two >= 8)"}})

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be 2-8, got {{self.bits}}")
        if self.group < 8 or self.group & (self.group - 1):
            raise ValueError(f"group must be a power of two >= 8, got {{self.group}}")


class {cls}(qf.Format):
    name = "{name}"
    description = "symmetric absmax grid, one float16 scale per group (a qf new-plugin starting point)"
    Options = {cls}Options

    options: {cls}Options

    @property
    def spec(self) -> str:
        return f"{{self.name}}-b{{self.options.bits}}-g{{self.options.group}}"

    @classmethod
    def from_spec(cls, spec: str) -> {cls}Options | None:
        m = re.fullmatch(re.escape(cls.name) + r"(?:-b(\\d+))?(?:-g(\\d+))?", spec.strip().lower())
        if m is None:
            return None
        return {cls}Options(bits=int(m.group(1) or 4), group=int(m.group(2) or 32))

    @classmethod
    def spec_help(cls) -> str:
        return f"{{cls.name}}[-b<bits>][-g<group>], e.g. {{cls.name}}-b4-g32"

    def group_size(self, in_features: int) -> int:
        return self.options.group

    def _half(self) -> int:
        return 1 << (self.options.bits - 1)

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> qf.Params:
        rows, cols = w.shape
        amax = w.float().reshape(rows, cols // self.options.group, self.options.group).abs().amax(-1)
        return {{"scale": (amax / (self._half() - 1)).to(torch.float16)}}  # rounded as stored

    def _scales(self, params: qf.Params, col0: int, ncols: int, device: torch.device) -> torch.Tensor:
        cols = torch.arange(col0, col0 + ncols, device=device) // self.options.group
        return params["scale"].float()[:, cols]

    def round(self, w: torch.Tensor, params: qf.Params, col0: int = 0) -> torch.Tensor:
        s = self._scales(params, col0, w.shape[1], w.device)
        q = torch.where(s > 0, torch.round(w.float() / torch.where(s > 0, s, 1.0)), 0.0)
        return (q.clamp(1 - self._half(), self._half() - 1) + self._half()).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: qf.Params, col0: int = 0) -> torch.Tensor:
        s = self._scales(params, col0, codes.shape[1], codes.device)
        return (codes.float() - self._half()) * s

    def code_bits(self) -> int:
        return self.options.bits


@hookimpl
def qf_register_formats(register):
    register({cls})
''',
    "exporter": '''\
\"\"\"{dist}: the exporter ``{name}``.

A starting point made by ``qf new-plugin``: a plain Hugging Face checkpoint (no
``quantization_config``) in which every quantized weight is stored dequantized, in ``dtype``
(float32 by default: exactly the values the quantized model computes with) — the "fake-quant"
model that any engine loads, for trying a format where no kernel reads its codes. Replace
``write``/``finish`` with your layout (packed codes, grid parameters, the config your engine
reads) and keep the contract (docs/lifecycle.md): ``begin`` once into an empty temporary
folder, ``write`` for every tensor, ``finish`` once; ``verify`` reopens what was written
before the folder is renamed into place.
\"\"\"

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.errors import ArtifactError
from quantfoundry.toolkit import (
    CheckpointOptions,
    ShardedSafetensorsWriter,
    artifact_skeleton,
    copy_tokenizer_files,
    load_float_parameters,
    read_manifest,
    stored_shapes,
    transformers_command,
)

DTYPES = {{"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}}


@dataclass(frozen=True, kw_only=True)
class {cls}Options(CheckpointOptions):
    dtype: str = field(default="float32", metadata={{
        "help": "dtype of the dequantized weights: float32 (exact), bfloat16 or float16 (half the size, rounded)"}})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {{', '.join(DTYPES)}}, got {{self.dtype}}")


class {cls}(qf.Exporter):
    name = "{name}"
    description = "a plain checkpoint with the quantized weights stored dequantized (a qf new-plugin starting point)"
    Options = {cls}Options
    default_format = "int4-g128"
    can_load = True

    options: {cls}Options

    def begin(self, folder: Path, source: qf.ModelSource, plan: qf.QuantPlan) -> None:
        self.folder, self.source = folder, source
        self.writer = ShardedSafetensorsWriter(folder, self.options.shard_mb)
        self.dequantized: list[str] = []

    def write(self, name: str, tensor: torch.Tensor | qf.QuantizedWeight) -> None:
        if isinstance(tensor, qf.QuantizedWeight):
            self.dequantized.append(name)
            tensor = tensor.dequantize(DTYPES[self.options.dtype])
        self.writer.add(name, tensor)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        files = self.writer.finish()
        config = json.loads((self.source.path / "config.json").read_text())
        config.pop("quantization_config", None)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\\n")
        copy_tokenizer_files(self.source.path, self.folder)
        return {{"files": files, "dequantized": self.dequantized}}

    def verify(self, folder: Path) -> None:
        manifest = read_manifest(folder)
        shapes = stored_shapes(folder, manifest["files"])
        missing = [n for n in manifest["dequantized"] if n not in shapes]
        if missing:
            raise ArtifactError(f"{{missing[0]}} is missing from the written files of {{folder}}")

    def load(self, folder: Path, device: torch.device, kernel: str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        model, source = artifact_skeleton(folder, dtype)
        return load_float_parameters(model, source, device, dtype)

    def dequantized_dtype(self, name: str) -> torch.dtype | None:
        return DTYPES[self.options.dtype]  # every quantized weight is stored dequantized (size accounting)

    def run_command(self, folder: Path) -> str | None:
        return transformers_command(folder)


@hookimpl
def qf_register_exporters(register):
    register({cls})
''',
    "evaluator": '''\
"""{dist}: the evaluator ``{name}``.

A starting point made by ``qf new-plugin``: the root mean square of the linear weights the
model computes with (quantized linears dequantized by their kernel's format), so a run shows
how much the quantization shrank or grew them. Replace ``evaluate`` with your metric.
"""

from __future__ import annotations

import quantfoundry as qf
import torch
from quantfoundry import hookimpl


class {cls}(qf.Evaluator):
    name = "{name}"
    description = "root mean square of the linear weights (a qf new-plugin starting point)"
    higher_is_better = {{"weight_rms": False}}

    def evaluate(self, target: qf.EvalTarget) -> dict[str, float | int | str]:
        if target.model is None:  # an artifact served by an engine: no weights to read
            return {{}}
        total, count = 0.0, 0
        for module in target.model.modules():
            if isinstance(module, qf.QuantLinear):
                w = module.qweight.dequantize(torch.float64)
            elif isinstance(module, torch.nn.Linear):
                w = module.weight.detach().double()
            else:
                continue
            total += float(w.pow(2).sum())
            count += w.numel()
        return {{"weight_rms": (total / max(count, 1)) ** 0.5, "weights": count}}


@hookimpl
def qf_register_evaluators(register):
    register({cls})
''',
    "calibrator": '''\
"""{dist}: the calibrator ``{name}``.

A starting point made by ``qf new-plugin``: ``n_samples`` windows of ``seq_len`` token ids
drawn uniformly from the vocabulary with a seeded generator (a baseline that shows what real
text buys). Replace ``load`` with your data source; keep the shape ``[n_samples, seq_len]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import quantfoundry as qf
import torch
from quantfoundry import hookimpl


@dataclass(frozen=True, kw_only=True)
class {cls}Options(qf.Options):
    n_samples: int = field(default=64, metadata={{"help": "calibration windows"}})
    seq_len: int = field(default=512, metadata={{"help": "tokens per window"}})
    seed: int = field(default=0, metadata={{"help": "seed of the token generator"}})

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seq_len < 2:
            raise ValueError("n_samples must be >= 1 and seq_len >= 2")


class {cls}(qf.Calibrator):
    name = "{name}"
    description = "uniformly random token ids (a qf new-plugin starting point)"
    Options = {cls}Options

    options: {cls}Options

    def load(self, tokenizer: Any) -> qf.CalibrationSet:
        g = torch.Generator().manual_seed(self.options.seed)
        ids = torch.randint(0, len(tokenizer), (self.options.n_samples, self.options.seq_len), generator=g)
        sha = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        return qf.CalibrationSet(ids, source=f"random tokens (seed {{self.options.seed}})", sha256=sha)


@hookimpl
def qf_register_calibrators(register):
    register({cls})
''',
    "kernel": '''\
"""{dist}: the kernel ``{name}``.

A starting point made by ``qf new-plugin``: dequantize the weight in the input's dtype on
every call, then ``torch.nn.functional.linear`` — every format, every device, no cache.
Replace ``serves``/``prepare``/``forward`` with your fused kernel; the tests compare it with the
reference kernel ``torch-dequant``.
"""

from __future__ import annotations

from typing import Any

import quantfoundry as qf
import torch
import torch.nn.functional as F
from quantfoundry import hookimpl


class {cls}(qf.Kernel):
    name = "{name}"
    description = "dequantize per call, then F.linear (a qf new-plugin starting point)"
    priority = -10  # below the built-in kernels: used only when asked for (--kernel {name})

    def serves(self, fmt: qf.Format, device: torch.device, tokens: int | None = None) -> str | None:
        return None  # every format on every device

    def forward(self, x: torch.Tensor, qw: qf.QuantizedWeight, state: Any, bias: torch.Tensor | None
                ) -> torch.Tensor:
        return F.linear(x, qw.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))


@hookimpl
def qf_register_kernels(register):
    register({cls})
''',
}

TESTS = {
    "exporter": '''\
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import ExporterConformance
from transformers import AutoModelForCausalLM


class Test{cls}Conformance(ExporterConformance):
    exporter = "{name}"


def test_plain_transformers_reads_the_rounded_weights(tiny_model, tmp_path) -> None:
    folder = tiny_model("llama")
    out = tmp_path / "artifact"
    result = qf.run(str(folder), exporter="{name}", format="int4-g32", out=out, progress=False, evaluators=["size"])
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    name = "model.layers.0.mlp.down_proj.weight"
    rounded = qf.resolve_format("int4-g32").quantize(original.get_parameter(name).detach())
    assert torch.equal(loaded.get_parameter(name), rounded.dequantize(torch.float32))
    assert torch.equal(loaded.get_parameter("model.norm.weight"), original.get_parameter("model.norm.weight"))
    # the size report counts what the file stores: float32 weights, 32 bits each
    weights = sum(original.get_submodule(n).weight.numel() for n in result.plan.quantized())
    assert result.metrics["size"]["linear_bytes"]["artifact"] == 4 * weights
''',
    "quantizer": '''\
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import QuantizerConformance
from {pkg} import {cls}


class Test{cls}Conformance(QuantizerConformance):
    quantizer = "{name}"


def test_shrink_1_is_round_to_nearest() -> None:
    fmt = qf.resolve_format("int4-g32")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    ctx = qf.QuantContext(device=torch.device("cpu"))
    assert torch.equal({cls}().quantize_tensor("w", w, fmt, ctx).dequantize(), fmt.quantize(w).dequantize())
''',
    "format": '''\
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import FormatConformance


class Test{cls}Conformance(FormatConformance):
    spec = "{name}-b4-g32"


def test_values_are_the_float64_grid() -> None:
    fmt = qf.resolve_format("{name}-b3-g16")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    qw = fmt.quantize(w)
    scale = w.double().view(8, 4, 16).abs().amax(-1) / 3
    scale = scale.to(torch.float16).double().repeat_interleave(16, dim=1)
    want = torch.round(w.double() / scale).clamp(-3, 3) * scale
    assert torch.equal(qw.dequantize(torch.float64), want)
    assert fmt.bits_per_weight((8, 64)) == 3 + 16 / 16
''',
    "evaluator": '''\
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import EvaluatorConformance
from {pkg} import {cls}


class Test{cls}Conformance(EvaluatorConformance):
    evaluator = "{name}"


def test_rms_of_a_known_linear() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    target = qf.EvalTarget(model, None, None, "original", torch.device("cpu"))
    assert {cls}().evaluate(target) == {{"weight_rms": 3.0, "weights": 8}}
''',
    "calibrator": '''\
import torch
from quantfoundry.testing.conformance import CalibratorConformance
from {pkg} import {cls}


class Test{cls}Conformance(CalibratorConformance):
    calibrator = "{name}"


class _Vocab:
    def __len__(self) -> int:
        return 100


def test_seeded_and_in_the_vocabulary() -> None:
    a = {cls}({cls}.Options(n_samples=3, seq_len=8)).load(_Vocab())
    b = {cls}({cls}.Options(n_samples=3, seq_len=8)).load(_Vocab())
    assert a.input_ids.shape == (3, 8) and torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert 0 <= int(a.input_ids.min()) and int(a.input_ids.max()) < 100
''',
    "kernel": '''\
import quantfoundry as qf
import torch
from quantfoundry.testing.conformance import KernelConformance
from {pkg} import {cls}


class Test{cls}Conformance(KernelConformance):
    kernel = "{name}"


def test_float64_reference() -> None:
    fmt = qf.resolve_format("int4-g32")
    qw = fmt.quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(3, 64, dtype=torch.float64)
    out = {cls}().forward(x, qw, None, None)
    torch.testing.assert_close(out, x @ qw.dequantize(torch.float64).T)
''',
}

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def scaffold(name: str, role: str, parent: Path) -> Path:
    """Write the package ``parent/name`` for a component of ``role``; returns its folder."""
    if role not in ROLES:
        raise UsageError(f"qf new-plugin makes a {', '.join(ROLES)}; got --role {role}")
    if not _NAME.match(name):
        raise UsageError(f"plugin name {name!r}: use lowercase letters, digits and dashes, e.g. qf-my-quantizer")
    folder = Path(parent) / name
    if folder.exists():
        raise UsageError(f"{folder} already exists; choose another name or --dir")
    component = name.removeprefix("qf-")
    pkg = name.replace("-", "_")
    cls = "".join(part.capitalize() for part in component.split("-"))
    cls = cls if cls[0].isalpha() else f"Plugin{cls}"
    fill = {"dist": name, "pkg": pkg, "name": component, "cls": cls, "role": role}
    files = {
        "pyproject.toml": PYPROJECT.format(**fill),
        "README.md": README.format(**fill),
        f"src/{pkg}/__init__.py": MODULES[role].format(**fill),
        "conftest.py": CONFTEST,
        f"tests/test_{pkg}.py": TESTS[role].format(**fill),
    }
    tmp = folder.with_name(f".{name}.tmp")
    for rel, text in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tmp.rename(folder)
    return folder
