"""Plugin discovery, registration, blocking, load errors and duplicates."""

from __future__ import annotations

import importlib.metadata
import sys
import types
from typing import Any

import pytest
import quantfoundry as qf
import torch
from quantfoundry import hookimpl
from quantfoundry.errors import DuplicateComponentError, UnknownComponentError
from quantfoundry.plugins import QFPluginManager


class Doubler(qf.Quantizer):
    name = "Doubler_Test"
    description = "a fake quantizer for the tests"
    scope = "tensor"

    def quantize_tensor(self, name, weight, fmt, ctx):
        return fmt.quantize(weight.float())


def builtin_names(pm: QFPluginManager, role: str) -> list[str]:
    """Names registered by built-ins (installed entry-point plugins such as the example one aside)."""
    reg = pm.registry(role)
    return [n for n in reg.names() if reg.entry(n).distribution is None]


class FakePlugin:
    @hookimpl
    def qf_register_quantizers(self, register):
        register(Doubler, aliases=("dbl",))


def test_builtins_register_through_the_hooks(qf_plugin_manager: QFPluginManager) -> None:
    names = qf_plugin_manager.plugin_names()
    for builtin in ("int-format", "rtn", "torch-dequant", "text-calibrator", "perplexity", "size", "qf-exporter",
                    "architectures"):
        assert builtin in names
    assert builtin_names(qf_plugin_manager, "quantizer") == ["rtn"]
    assert builtin_names(qf_plugin_manager, "evaluator") == ["calibration-mismatch", "kl", "perplexity", "size", "speed"]


def test_fixture_registered_plugin_is_seen_and_names_normalize(register_plugin, qf_plugin_manager) -> None:
    assert "doubler-test" not in qf_plugin_manager.registry("quantizer")
    register_plugin(FakePlugin(), "fake")
    reg = qf_plugin_manager.registry("quantizer")
    assert reg.get("doubler_test") is Doubler
    assert reg.get("DOUBLER TEST") is Doubler
    assert reg.get("dbl") is Doubler
    assert reg.entry("dbl").plugin == "fake"


def test_unknown_name_suggests(qf_plugin_manager) -> None:
    with pytest.raises(UnknownComponentError, match="unknown quantizer 'rtm'; did you mean 'rtn'"):
        qf_plugin_manager.registry("quantizer").get("rtm")


def test_duplicate_names_are_an_error_naming_both(register_plugin, qf_plugin_manager) -> None:
    class Again:
        @hookimpl
        def qf_register_quantizers(self, register):
            register(type("RTN2", (Doubler,), {"name": "rtn"}))

    register_plugin(Again(), "again-plugin")
    with pytest.raises(DuplicateComponentError) as info:
        qf_plugin_manager.registry("quantizer")
    assert "'rtn' is registered by both rtn and again-plugin" in str(info.value)


def test_registration_error_is_reported_and_others_work(register_plugin, qf_plugin_manager) -> None:
    class Broken:
        @hookimpl
        def qf_register_quantizers(self, register):
            raise RuntimeError("boom in register")

    register_plugin(Broken(), "broken-reg")
    with pytest.warns(RuntimeWarning, match="plugin 'broken-reg' failed to register: RuntimeError: boom"):
        reg = qf_plugin_manager.registry("quantizer")
    assert builtin_names(qf_plugin_manager, "quantizer") == ["rtn"]
    assert "doubler-test" not in reg
    assert [f.name for f in qf_plugin_manager.load_errors] == ["broken-reg"]


class DummyEntryPoint:
    def __init__(self, name: str, value: str, group: str = "quantfoundry"):
        self.name, self.value, self.group = name, value, group

    def load(self) -> Any:
        module, _, attr = self.value.partition(":")
        mod = __import__(module, fromlist=["_"])
        return getattr(mod, attr) if attr else mod


class DummyDist:
    def __init__(self, name: str, version: str, eps: list[DummyEntryPoint]):
        self.metadata = {"Name": name}
        self.version = version
        self.entry_points = eps


@pytest.fixture
def fake_distributions(monkeypatch):
    good = types.ModuleType("qf_fake_good")
    good.qf_register_quantizers = hookimpl(lambda register: register(Doubler))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qf_fake_good", good)
    dists = [
        DummyDist("qf-fake-good", "1.2.3", [DummyEntryPoint("fake-good", "qf_fake_good")]),
        DummyDist("qf-fake-broken", "0.0.1", [DummyEntryPoint("fake-broken", "qf_no_such_module_xyz")]),
        DummyDist("other", "1.0", [DummyEntryPoint("x", "os", group="not-ours")]),
    ]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: iter(dists))
    return dists


def test_entry_points_are_discovered_and_a_broken_one_reported(fake_distributions) -> None:
    pm = QFPluginManager()
    with pytest.warns(RuntimeWarning, match=r"plugin 'fake-broken' \(qf-fake-broken 0.0.1\) failed to import"):
        pm.load()
    assert pm.registry("quantizer").get("doubler-test") is Doubler
    entry = pm.registry("quantizer").entry("doubler-test")
    assert (entry.plugin, entry.distribution, entry.version) == ("fake-good", "qf-fake-good", "1.2.3")
    assert [f.name for f in pm.load_errors] == ["fake-broken"]
    assert "ModuleNotFoundError" in pm.load_errors[0].error
    assert pm.registry("quantizer").get("rtn")  # the rest keep working


def test_autoload_kill_switch(fake_distributions, monkeypatch) -> None:
    monkeypatch.setenv("QF_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = QFPluginManager().load()
    assert "doubler-test" not in pm.registry("quantizer")
    assert not pm.load_errors


def test_blocking_by_env_and_by_name(fake_distributions, monkeypatch) -> None:
    monkeypatch.setenv("QF_DISABLED_PLUGINS", "fake-broken,rtn")
    pm = QFPluginManager().load()
    assert pm.registry("quantizer").names() == ["doubler-test"]
    assert not pm.load_errors
    pm2 = QFPluginManager().load(blocked=["fake-good"])
    assert "doubler-test" not in pm2.registry("quantizer")


def test_load_allowlist(fake_distributions, monkeypatch) -> None:
    monkeypatch.setenv("QF_LOAD_PLUGINS", "fake-good")
    pm = QFPluginManager().load()
    assert "doubler-test" in pm.registry("quantizer") and not pm.load_errors


def test_misspelled_hook_fails_loudly(register_plugin, qf_plugin_manager) -> None:
    from pluggy import PluginValidationError

    class Typo:
        @hookimpl
        def qf_register_quantizer(self, register):  # missing "s"
            pass

    register_plugin(Typo(), "typo")
    with pytest.raises(PluginValidationError):
        qf_plugin_manager.check_pending()


def test_a_misspelled_hook_in_an_entry_point_is_isolated(fake_distributions, monkeypatch) -> None:
    """pluggy's check_pending raises for the whole manager; one bad plugin must not stop the rest."""
    typo = types.ModuleType("qf_fake_typo")
    typo.qf_register_quantizer = hookimpl(lambda register: None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qf_fake_typo", typo)
    fake_distributions.append(DummyDist("qf-fake-typo", "0.1", [DummyEntryPoint("fake-typo", "qf_fake_typo")]))
    pm = QFPluginManager()
    with pytest.warns(RuntimeWarning, match=r"plugin 'fake-typo' \(qf-fake-typo 0.1\) failed to register: "
                      r"PluginValidationError: unknown hook 'qf_register_quantizer' "
                      r"\(did you mean 'qf_register_quantizers'\?\)"):
        pm.load()
    assert pm.get_plugin("fake-typo") is None
    assert pm.registry("quantizer").get("doubler-test") is Doubler  # the other entry point loaded
    assert pm.registry("quantizer").get("rtn")
    pm.check_pending()  # nothing pending is left


def test_trace_plugins_prints_every_registration_call(monkeypatch, capfd) -> None:
    monkeypatch.setenv("QF_TRACE_PLUGINS", "1")
    monkeypatch.setenv("QF_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = QFPluginManager().load()
    pm.registry("quantizer")
    pm.registry("format")
    err = capfd.readouterr().err
    assert "qf_register_quantizers(register) [plugin rtn] -> quantizer rtn" in err
    assert "qf_register_formats(register) [plugin int-format] -> format int" in err


def test_skipped_entry_points_and_unknown_blocks_are_warned(fake_distributions, monkeypatch) -> None:
    fake_distributions.append(DummyDist("qf-fake-shadow", "2.0", [DummyEntryPoint("rtn", "qf_fake_good")]))
    fake_distributions.append(DummyDist("qf-fake-good-fork", "9.9", [DummyEntryPoint("fake-good", "qf_fake_good")]))
    pm = QFPluginManager()
    with pytest.warns(RuntimeWarning) as record:
        pm.load(blocked=["no-such-plugin"])
    messages = [str(w.message) for w in record]
    assert any("entry point 'rtn' of qf-fake-shadow is not loaded: a built-in plugin has that name" in m
               for m in messages)
    assert any("entry point 'fake-good' of qf-fake-good-fork is not loaded: qf-fake-good provides one" in m
               for m in messages)
    assert any("no plugin is named 'no-such-plugin', so blocking it does nothing" in m for m in messages)
    assert len(pm.notices) == 3
    assert pm.registry("quantizer").entry("doubler-test").distribution == "qf-fake-good"


def test_blocking_by_distribution_name(fake_distributions) -> None:
    pm = QFPluginManager().load(blocked=["qf-fake-good"])
    assert "doubler-test" not in pm.registry("quantizer")
    assert not pm.notices  # a distribution name is a known name


def test_cli_help_example_blocks_the_gptq_plugin() -> None:
    """The -p help says `-p no:qf-gptq`: it must block qf-gptq (entry point `gptq`)."""
    from click.testing import CliRunner
    from quantfoundry import plugins
    from quantfoundry.cli import cli

    assert "-p no:qf-gptq" in " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
    plugins.reset_plugin_manager()
    try:
        result = CliRunner().invoke(cli, ["plugins"], catch_exceptions=False)
        assert "gptq" in result.output.split("quantizers:")[1].splitlines()[0]
        plugins.reset_plugin_manager()
        result = CliRunner().invoke(cli, ["-p", "no:qf-gptq", "plugins"], catch_exceptions=False)
        quantizers = result.output.split("quantizers:")[1].splitlines()[0]
        assert "gptq" not in quantizers and "rtn" in quantizers
        assert "hf-gptq" not in result.output.split("exporters:")[1].splitlines()[0]
    finally:
        plugins.reset_plugin_manager()


def test_cli_plugins_lists_versions_and_errors(fake_distributions) -> None:
    from click.testing import CliRunner
    from quantfoundry import plugins
    from quantfoundry.cli import cli

    plugins.reset_plugin_manager()
    try:
        result = CliRunner().invoke(cli, ["plugins"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "fake-good" in result.output and "qf-fake-good 1.2.3" in result.output
        assert "quantizer doubler-test" in result.output
        assert "fake-broken" in result.output and "failed to import" in result.output
        plugins.reset_plugin_manager()
        result = CliRunner().invoke(cli, ["-p", "no:fake-good", "-p", "no:rtn", "plugins"], catch_exceptions=False)
        assert "quantizers: -" in result.output
        plugins.reset_plugin_manager()
        result = CliRunner().invoke(cli, ["plugins", "--options", "int"])
        assert "group_size: int = 128" in result.output
    finally:
        plugins.reset_plugin_manager()


def test_a_user_quantizer_runs_end_to_end(register_plugin, tmp_path) -> None:
    """A plugin's quantizer runs through the whole pipeline without any core change."""
    seen: list[str] = []

    class Recording(qf.Quantizer):
        name = "recording"
        scope = "tensor"

        def quantize_tensor(self, name, weight, fmt, ctx):
            seen.append(name)
            return fmt.quantize(weight.to(torch.float32))

    class P:
        @hookimpl
        def qf_register_quantizers(self, register):
            register(Recording)

    register_plugin(P(), "recording-plugin")
    result = qf.run(quantizer="recording", format="int8", out=tmp_path / "o", progress=False)
    assert len(seen) == 42 and seen[0] == "model.layers.0.self_attn.q_proj"
    assert result.manifest["quantizer"][0]["name"] == "recording"
    assert "recording-plugin" in result.manifest["plugins"]
