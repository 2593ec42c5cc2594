"""Import hygiene: `import quantfoundry` stays light (no transformers, no CUDA init)."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import sys, torch\n"
        "torch.cuda.current_device = lambda: (_ for _ in ()).throw(RuntimeError('CUDA initialised'))\n"
        "import quantfoundry\n"
        "pm = quantfoundry.get_plugin_manager()\n"
        "for role in ('format', 'quantizer', 'exporter', 'kernel', 'calibrator', 'evaluator', 'architecture'):\n"
        "    pm.registry(role)\n"
        "bad = [m for m in ('transformers', 'accelerate', 'safetensors', 'rich') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
