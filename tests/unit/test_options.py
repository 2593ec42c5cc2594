from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from quantfoundry.errors import OptionsError
from quantfoundry.options import Options, parse_key_values, parse_options


@dataclass(frozen=True, kw_only=True)
class Demo(Options):
    bits: int = field(default=4, metadata={"help": "bits"})
    damp: float = 0.01
    sym: bool = False
    path: Path | None = None
    mode: Literal["fast", "slow"] = "fast"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits > 8:
            raise ValueError("bits must be <= 8")


def test_strings_convert_to_field_types(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("")
    o = parse_options(Demo, {"bits": "3", "damp": "0.1", "sym": "true", "path": "x.txt", "mode": "slow",
                             "names": "a,b"})
    assert o == Demo(bits=3, damp=0.1, sym=True, path=Path("x.txt"), mode="slow", names=("a", "b"))


def test_toml_values_convert_too() -> None:
    assert parse_options(Demo, {"bits": 2, "damp": 1, "sym": False}) == Demo(bits=2, damp=1.0, sym=False)


def test_none_for_optional() -> None:
    assert parse_options(Demo, {"path": "none"}).path is None


def test_dashes_map_to_underscores() -> None:
    @dataclass(frozen=True, kw_only=True)
    class GroupOptions(Options):
        group_size: int = 128

    assert parse_options(GroupOptions, {"group-size": "64"}).group_size == 64


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"bitz": "3"}, "unknown option 'bitz' for demo; valid options: bits: int = 4"),
        ({"bits": "three"}, "option 'bits' for demo: expected int, got 'three'"),
        ({"sym": "maybe"}, "expected bool"),
        ({"mode": "medium"}, "expected one of 'fast', 'slow'"),
        ({"bits": "9"}, "bad options for demo: bits must be <= 8"),
        ({"bits": True}, "expected int"),
    ],
)
def test_errors_are_one_line_and_list_valid_keys(values: dict, fragment: str) -> None:
    with pytest.raises(OptionsError) as info:
        parse_options(Demo, values, owner="demo")
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "damp: float = 0.01" in msg and "mode: 'fast' | 'slow' = 'fast'" in msg


def test_key_values() -> None:
    assert parse_key_values(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(OptionsError, match="--quantizer-opt expects key=value, got 'oops'"):
        parse_key_values(["oops"], flag="--quantizer-opt")


def test_path_options_must_name_existing_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionsError, match=r"option 'path' for thing 'demo': missing.txt does not exist"):
        parse_options(Demo, {"path": "missing.txt"}, owner="thing 'demo'")


@dataclass(frozen=True, kw_only=True)
class Written(Options):
    report: Path | None = field(default=None, metadata={"output": True})
    inputs: tuple[Path, ...] = ()


def test_output_paths_are_not_checked_and_tuples_are(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("")
    assert parse_options(Written, {"report": "new.json", "inputs": "a.txt"}).report == Path("new.json")
    with pytest.raises(OptionsError, match="b.txt does not exist"):
        parse_options(Written, {"inputs": "a.txt,b.txt"})
