"""The Planner role: budgets, the allocation under a budget (checked against exhaustive search),
and a planner's plan through the pipeline — the exporter's candidates, exact bytes, the plan
written and reloaded, the manifest, and every refusal before any work."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import quantfoundry as qf
import torch
from quantfoundry import Budget, Exporter, Planner, PlanRequest, hookimpl
from quantfoundry.builtin.qf_exporter import QFExporter
from quantfoundry.errors import IncompatiblePlanError, UsageError
from quantfoundry.roles.planner import parse_size
from quantfoundry.toolkit import allocate, lower_hull
from safetensors import safe_open

# -- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "want"), [("3.9GB", 3_900_000_000), ("512MiB", 512 * 2**20), ("123456", 123456),
                                            (2048, 2048), ("1.5 kb", 1500), ("4GiB", 4 * 2**30)])
def test_sizes_parse_with_units(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["3.9 parsecs", "-1", "0", "GB", ""])
def test_bad_sizes_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_bpw_budget_is_bits_per_weight_of_the_whole_model():
    b = Budget.of(7_000_000, target_bpw=4.5)
    assert b.bytes == 7_000_000 * 4.5 / 8 and b.bpw == pytest.approx(4.5)
    with pytest.raises(ValueError, match="one of"):
        Budget.of(10, target_bpw=4, target_size="1MB")
    with pytest.raises(ValueError, match="target_bpw"):
        Budget.of(10, target_bpw=0)


# -- the allocation -----------------------------------------------------------------------------


def _exhaustive(options: dict[str, list[tuple[int, float]]], budget: int) -> float:
    best = float("inf")
    names = list(options)
    for pick in itertools.product(*(range(len(options[n])) for n in names)):
        size = sum(options[n][i][0] for n, i in zip(names, pick, strict=True))
        if size <= budget:
            best = min(best, sum(options[n][i][1] for n, i in zip(names, pick, strict=True)))
    return best


def _random_options(rng: random.Random) -> dict[str, list[tuple[int, float]]]:
    """Tensors with formats like a real table: more bytes, less loss (roughly 4x per bit), with noise."""
    out = {}
    for t in range(rng.randint(2, 5)):
        size, scale = rng.choice([100, 300, 800]), rng.uniform(0.1, 10)
        out[f"t{t}"] = [(size * bits // 8, scale * 4.0 ** -bits * rng.uniform(0.7, 1.4)) for bits in (2, 3, 4, 5, 6, 8)]
    return out


def test_the_allocation_fits_and_is_near_the_exhaustive_optimum():
    rng = random.Random(0)
    exact = 0
    for _ in range(120):
        options = _random_options(rng)
        low = sum(min(b for b, _ in o) for o in options.values())
        high = sum(max(b for b, _ in o) for o in options.values())
        budget = rng.randint(low, high)
        got = allocate(options, budget)
        size = sum(options[n][i][0] for n, i in got.choice.items())
        assert size == got.bytes <= budget
        assert got.cost == pytest.approx(sum(options[n][i][1] for n, i in got.choice.items()))
        best = _exhaustive(options, budget)
        assert got.cost >= best - 1e-12
        # never worse than the optimum with the largest single upgrade's bytes less to spend
        step = max(b1 - b0 for o in options.values() for (b0, _), (b1, _) in itertools.pairwise(sorted(o)))
        assert got.cost <= _exhaustive(options, budget - step) + 1e-12
        exact += got.cost <= best + 1e-12
    assert exact >= 100  # the Lagrangian solution with its fill is the optimum in most cases


def test_a_budget_below_the_smallest_plan_is_refused():
    with pytest.raises(ValueError, match="smallest plan"):
        allocate({"a": [(10, 1.0), (20, 0.5)]}, 25, fixed=20)


def test_the_lower_hull_keeps_the_points_a_multiplier_can_reach():
    pts = [(10, 5.0), (20, 2.0), (30, 1.9), (25, 1.0), (40, 0.0), (50, 0.5)]
    hull = lower_hull(pts)
    assert hull == [0, 1, 3, 4]
    # every other point lies on or above the chord between its hull neighbours
    for i, (b, c) in enumerate(pts):
        if i in hull:
            continue
        for a, z in itertools.pairwise(hull):
            (b0, c0), (b1, c1) = pts[a], pts[z]
            if b0 <= b <= b1:
                assert c >= c0 + (c1 - c0) * (b - b0) / (b1 - b0)


# -- a planner through the pipeline -------------------------------------------------------------


class Extremes(Planner):
    """Down projections at their largest candidate, every other tensor at its smallest."""

    name = "test-extremes"
    needs_calibration = False
    seen: list[PlanRequest] = []  # noqa: RUF012 - the tests read what the call saw

    def plan(self, request: PlanRequest) -> qf.QuantPlan:
        Extremes.seen.append(request)
        choice = {}
        for name, cands in request.candidates.items():
            grids = [f for f in cands if f is not None]
            sizes = {f.spec: request.nbytes(name, f) for f in grids}
            pick = max if name.endswith("down_proj") else min
            choice[name] = pick(grids, key=lambda f, sizes=sizes: sizes[f.spec])
        return request.choose(choice, reasons={n: "test rule" for n in choice}, info={"rule": "extremes"})


class OneFormat(QFExporter):
    """qf's exporter, told to store one format only (the base class's refusal)."""

    name = "test-one-format"
    mix_candidates = Exporter.mix_candidates


class Plugin:
    @hookimpl
    def qf_register_planners(self, register):
        register(Extremes)

    @hookimpl
    def qf_register_exporters(self, register):
        register(OneFormat)


@pytest.fixture
def planner_plugin(register_plugin):
    register_plugin(Plugin(), "test-planner-plugin")
    Extremes.seen.clear()


def _stored_bytes(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def test_a_planners_mix_is_written_reloaded_and_counted_exactly(tiny_model, tmp_path, planner_plugin):
    folder = tiny_model("llama")
    out = tmp_path / "mixed"
    r = qf.run(str(folder), format="int4-g32", planner="test-extremes", target_bpw=16, out=str(out),
               evaluators=[], progress=False)
    request = Extremes.seen[0]
    # the exporter's candidates: every block linear, int2 ... int8 at g32 and float
    assert set(request.candidates) == {n for n in r.plan.entries if ".layers." in n}
    specs = [f.spec if f else None for f in request.candidates["model.layers.0.mlp.up_proj"]]
    assert specs == ["int2-g32", "int3-g32", "int4-g32", "int5-g32", "int6-g32", "int8-g32", None]
    for name, entry in r.plan.quantized().items():
        want = "int8-g32" if name.endswith("down_proj") else "int2-g32"
        assert entry.format.spec == want and entry.reason == "test rule"
    # the planner's byte count is the artifact's: every stored tensor, codes, grids and float ones
    planner = r.manifest["planner"]
    assert planner["name"] == "test-extremes" and planner["rule"] == "extremes"
    assert planner["planned_bytes"] == _stored_bytes(out)
    params = sum(t.numel() for t in _load_original(folder).values())
    assert planner["planned_bpw"] == pytest.approx(8 * planner["planned_bytes"] / params, abs=1e-4)
    manifest = json.loads((out / "quantfoundry.json").read_text())
    assert manifest["plan"]["model.layers.1.mlp.down_proj"]["format"] == "int8-g32"
    loaded = qf.load(str(out))
    for name, entry in r.plan.quantized().items():
        assert loaded.get_submodule(name).qweight.format.spec == entry.format.spec


def _load_original(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_dry_run_shows_each_choice_and_its_reason(tiny_model, planner_plugin):
    from click.testing import CliRunner
    from quantfoundry.cli import cli

    folder = tiny_model("llama")
    res = CliRunner().invoke(cli, ["run", "--model", str(folder), "--format", "int4-g32", "--planner", "test-extremes",
                                   "--target-size", "10MB", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "int8-g32" in res.output and "int2-g32" in res.output and "test rule" in res.output
    assert "planner 'test-extremes'" in res.output


def _smallest(folder: Path) -> int:
    from quantfoundry.pipeline.stages import RunRequest, plan_request, resolve

    state = resolve(RunRequest(model=str(folder), format="int4-g32", planner="test-extremes", target_bpw=32))
    source = qf.resolve_model(str(folder))
    return plan_request(state, source, state.exporter.plan(source, state.requested)).smallest_bytes()


def test_a_budget_below_the_smallest_plan_is_refused_before_the_planner_runs(tiny_model, tmp_path, planner_plugin):
    folder, out = tiny_model("llama"), tmp_path / "x"
    smallest = _smallest(folder)
    with pytest.raises(UsageError, match=f"below the smallest plan.*{smallest:,} bytes.*raise the target"):
        qf.run(str(folder), format="int4-g32", planner="test-extremes", target_size=smallest - 1, out=str(out),
               evaluators=[], progress=False)
    assert not Extremes.seen and not out.exists()


def test_a_planner_over_its_budget_is_refused_before_writing(tiny_model, tmp_path, planner_plugin):
    folder, out = tiny_model("llama"), tmp_path / "x"
    with pytest.raises(UsageError, match="over the budget"):  # int8 down projections do not fit the smallest plan
        qf.run(str(folder), format="int4-g32", planner="test-extremes", target_size=_smallest(folder), out=str(out),
               evaluators=[], progress=False)
    assert Extremes.seen and not out.exists()


def test_an_exporter_that_stores_one_format_refuses_before_any_work(tiny_model, tmp_path, planner_plugin):
    out = tmp_path / "x"
    with pytest.raises(IncompatiblePlanError, match="one format for every tensor.*drop --planner"):
        qf.run(str(tiny_model("llama")), exporter="test-one-format", format="int4-g32", planner="test-extremes",
               target_bpw=4, out=str(out), evaluators=[], progress=False)
    assert not Extremes.seen and not out.exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_bpw": 4}, "add --planner"),
    ({"planner": "test-extremes"}, "needs a budget"),
    ({"planner": "test-extremes", "target_bpw": 4, "target_size": "1MB"}, "not both"),
    ({"planner": "test-extremes", "target_size": "4 parsecs"}, "--target-size: size"),
    ({"planner": "test-extremes", "target_bpw": -1}, "--target-bpw"),
    ({"planner": "no-such-planner", "target_bpw": 4}, "unknown planner"),
    ({"planner_options": {"x": 1}}, "add --planner NAME"),
])
def test_budget_flags_are_checked_before_the_model_is_touched(kwargs, match, planner_plugin):
    with pytest.raises(UsageError, match=match):
        qf.run("/nonexistent/model", format="int4-g32", evaluators=[], progress=False, **kwargs)


def test_w8a8_runs_are_refused_a_weight_only_planner(tiny_model, planner_plugin):
    with pytest.raises(IncompatiblePlanError, match="weight-only"):
        qf.run(str(tiny_model("llama")), format="int8-sym", activations="int8", planner="test-extremes",
               target_bpw=8, evaluators=[], progress=False)


def test_a_recipe_names_the_planner_and_its_budget(tmp_path):
    from quantfoundry.recipe import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('target_bpw = 4\n[exporter]\nname = "gguf"\n[planner]\nname = "kl"\nsamples = 4\n')
    args = load_recipe(recipe)
    assert args["planner"] == "kl" and args["planner_options"] == {"samples": 4} and args["target_bpw"] == 4.0
    recipe.write_text('target_size = 3900000000\n[planner]\nname = "kl"\n')
    assert load_recipe(recipe)["target_size"] == "3900000000"
