"""Phase timings (``quantfoundry.phases``): exclusive time per phase, and a run's breakdown."""

from __future__ import annotations

import time

import pytest
import quantfoundry as qf
from quantfoundry.toolkit import measuring, phase


def test_nested_phases_count_exclusive_time() -> None:
    with measuring() as clock:
        with phase("outer"):
            time.sleep(0.02)
            with phase("inner"):
                time.sleep(0.03)
            with phase("inner"):
                time.sleep(0.01)
        with phase("outer"):
            pass
    t = clock.seconds()
    assert list(t) == ["inner", "outer"]  # first finished first
    assert t["inner"] == pytest.approx(0.04, abs=0.015)
    assert t["outer"] == pytest.approx(0.02, abs=0.015)  # the inner 0.04 s left out


def test_phases_outside_a_clock_do_nothing() -> None:
    with phase("alone"):
        pass
    with measuring() as clock:
        pass
    assert clock.seconds() == {}


def test_a_gguf_run_reports_where_its_time_went(tiny_model, tmp_path) -> None:
    r = qf.run(tiny_model("llama"), exporter="gguf", exporter_options={"type": "Q8_0"}, out=tmp_path / "o",
               evaluators=[("perplexity", {"ctx": 32, "max_tokens": 100})], progress=False)
    t = r.timings
    assert {"load", "quantize", "encode", "export", "evaluate"} <= set(t)
    assert all(v >= 0 for v in t.values())
    assert sum(t.values()) <= r.seconds + 1e-3  # exclusive: the phases do not overlap
