"""The one typed, strict config parser (distill.config.parse_dataclass) every config goes through."""
from dataclasses import dataclass, field

import numpy as np
import pytest

from distill.config import ConfigError, parse_dataclass


@dataclass
class Inner:
    k: int
    rate: float = 0.5


@dataclass
class Outer:
    inner: Inner
    sizes: tuple[int, ...] = (1, 2)
    items: list[Inner] = field(default_factory=list)
    name: str | None = None
    on: bool = True


def test_types_are_checked_and_converted():
    cfg = parse_dataclass(Outer, {"inner": {"k": np.int64(3), "rate": 1}, "sizes": [4, 5.0],
                                  "items": [{"k": 1e3}]}, "")
    assert cfg.inner == Inner(3, 1.0) and type(cfg.inner.k) is int and cfg.sizes == (4, 5)
    assert cfg.items == [Inner(1000)] and cfg.name is None
    built = Inner(7)
    assert parse_dataclass(Outer, {"inner": built}, "").inner is built      # an already built part, as is
    for raw, msg in (({"inner": {"k": 2.5}}, "inner.k: expected an integer"),
                     ({"inner": {"k": True}}, "inner.k: expected an integer"),
                     ({"inner": {"k": 1}, "on": 1}, "on: expected true/false"),
                     ({"inner": {"k": 1}, "sizes": "12"}, "sizes: expected a list"),
                     ({}, "missing required config key 'inner'"),
                     ({"inner": {"kk": 1}}, r"unknown key 'kk' in inner \(did you mean 'k'\?\)")):
        with pytest.raises(ConfigError, match=msg):
            parse_dataclass(Outer, raw, "")


def test_differing_keys_name_dotted_paths_lists_included():
    from distill.config import differing_keys
    a = {"optim": {"lr": 1e-3, "betas": [0.9, 0.98]}, "teachers": [{"spec": "x"}], "logging": {"every": 5}}
    b = {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "teachers": [{"spec": "y"}, {"spec": "z"}],
         "logging": {"every": 1}, "seed": 1}
    assert differing_keys(a, b, ignore=("logging",)) == ["optim.betas.1", "seed", "teachers.0.spec", "teachers.1.spec"]
    assert differing_keys(a, a) == []
