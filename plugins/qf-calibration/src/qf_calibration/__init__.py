"""qf-calibration: calibration that looks like production traffic.

* ``chat`` — conversations from a JSONL file, rendered with the model's chat template;
* ``hf-dataset`` — any dataset the ``datasets`` library opens (Hub or local), streamed;
* ``mix`` — a weighted mixture of calibrators, each with its own options.

Each gives one document per sequence or packed windows (:mod:`.sampling` says what each does
to attention and to the statistics the quantizers collect).
"""

from __future__ import annotations

from quantfoundry import hookimpl

from .chat import ChatCalibrator
from .hf_dataset import HFDatasetCalibrator
from .mix import MixCalibrator

__all__ = ["ChatCalibrator", "HFDatasetCalibrator", "MixCalibrator"]


@hookimpl
def qf_register_calibrators(register):
    register(ChatCalibrator)
    register(HFDatasetCalibrator)
    register(MixCalibrator)
