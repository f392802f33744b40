"""Config loading: unknown keys are named, types are checked, overrides apply."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from simdiff.configuration import ConfigError, apply_overrides, from_dict, get_registered, load_yaml, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)
    maybe: int | None = None


def test_round_trip_and_coercion():
    cfg = from_dict(Outer, {"steps": 5, "inner": {"lr": 1, "sizes": [3, 4]}, "maybe": 2})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.sizes == (3, 4)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_unknown_key_named_with_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.lrr'.*valid keys of inner: kind, lr, sizes"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"steps: expected an integer"):
        from_dict(Outer, {"steps": "ten"})
    with pytest.raises(ConfigError, match=r"inner.kind: 'c' is not one of"):
        from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match="expected true/false"):

        @dataclass(frozen=True)
        class B:
            flag: bool = False

        from_dict(B, {"flag": "yes"})


def test_overrides_parse_yaml_scalars():
    d = apply_overrides({"inner": {"lr": 1.0}}, ["inner.lr=3e-4", "steps=7", "inner.sizes=[1, 5]"])
    cfg = from_dict(Outer, d)
    assert cfg.inner.lr == 3e-4 and cfg.steps == 7 and cfg.inner.sizes == (1, 5)
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


def test_registry_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown sampler 'foo'; valid: a, b"):
        get_registered({"b": 1, "a": 2}, "foo", "sampler")
    p = tmp_path / "c.yaml"
    p.write_text("steps: 3\ninner: {lr: 0.5}\n")
    assert from_dict(Outer, load_yaml(p)).steps == 3
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(p)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
