"""TOML recipes: the same settings as ``qf run``'s flags, one table per role.

```toml
model = "./my-model"          # top-level keys mirror the flags: model, out, device, dtype, ...
[quantizer]                   # or [[quantizer]] tables for chained stages
name = "rtn"
[format]
name = "int4-g128"            # any other key is a format option
[exporter]
name = "qf"
[calibrator]
name = "text"
path = "calib.txt"
[[evaluator]]
name = "perplexity"
[planner]                     # optional: a mixed-precision plan for a budget
name = "kl"
# with target_bpw = 4.5 (or target_size = "3.9GB") at the top level
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .errors import UsageError

TOP_LEVEL = {"model": str, "out": str, "device": str, "dtype": str, "batch_size": int, "threads": int, "allow_pickle": bool,
             "trust_remote_code": bool, "revision": str, "overwrite": bool, "imatrix": bool,
             "activations": str, "act_observer": str, "kv_cache": str, "target_bpw": float, "target_size": str,
             "target": str, "expert_routing": str, "expert_min_tokens": int}
ROLE_TABLES = ("quantizer", "format", "exporter", "calibrator", "evaluator", "kernel", "planner")


def _named(table: Any, where: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(table, dict) or not isinstance(table.get("name"), str):
        raise UsageError(f"recipe table [{where}] needs a string key 'name'")
    opts = {k: v for k, v in table.items() if k != "name"}
    return table["name"], opts


def load_recipe(path: Path) -> dict[str, Any]:
    """Parse a recipe into ``run()`` keyword arguments (role tables → (name, options))."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in TOP_LEVEL:
            if key == "target_bpw" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if key == "target_size" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, TOP_LEVEL[key]):
                raise UsageError(f"recipe key {key!r} must be a {TOP_LEVEL[key].__name__}, got {value!r}")
            out[key] = value
        elif key == "quantizer":
            tables = value if isinstance(value, list) else [value]
            out["quantizer"] = [_named(t, "quantizer") for t in tables]
        elif key == "evaluator":
            tables = value if isinstance(value, list) else [value]
            out["evaluators"] = [_named(t, "evaluator") for t in tables]
        elif key in ("format", "exporter", "calibrator", "kernel", "planner"):
            name, opts = _named(value, key)
            out[key] = name
            out[f"{key}_options"] = opts
        else:
            valid = ", ".join([*TOP_LEVEL, *(f"[{t}]" for t in ROLE_TABLES)])
            raise UsageError(f"unknown recipe key {key!r} in {path}; valid: {valid}")
    return out
