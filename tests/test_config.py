"""Config loading and validation (hpcgan/config.py): YAML plus dotted overrides into dataclasses,
errors naming the key."""

import dataclasses
from typing import Literal

import pytest

from hpcgan.config import load_config
from hpcgan.errors import UsageError


@dataclasses.dataclass
class Inner:
    lr: float = 2e-4
    norm: Literal["batch", "none"] = "batch"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    widths: list[int] = dataclasses.field(default_factory=list)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lr: 1e-3\nsteps: 5\n")
    cfg = load_config(Outer, path, ["inner.norm=none", "widths=[32, 64]", "steps=7"])
    assert cfg == Outer(Inner(1e-3, "none"), 7, [32, 64])


@pytest.mark.parametrize(
    "yaml_text, overrides, key",
    [
        ("stepz: 5\n", [], "stepz"),
        ("steps: five\n", [], "steps"),
        ("", ["inner.norm=group"], "inner.norm"),
        ("", ["inner.lr=fast"], "inner.lr"),
        ("inner: 3\n", [], "inner"),
        ("", ["steps"], "steps"),
        ("steps: [1\n", [], "line"),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_text, overrides, key):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UsageError) as info:
        load_config(Outer, path, overrides)
    assert key in str(info.value) and "\n" not in str(info.value)
