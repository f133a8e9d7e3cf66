"""Schedules: constants, warm-ups, delayed starts, cyclical annealing and start_fraction."""

from __future__ import annotations

import dataclasses

import pytest

from vaegan.errors import ConfigError
from vaegan.schedules import Schedule


def test_default_is_constant_one():
    s = Schedule()
    assert [s(t) for t in (0, 1, 10, 10**9)] == [1.0, 1.0, 1.0, 1.0]


def test_constant():
    s = Schedule.constant(0.25)
    assert s == Schedule(value=0.25)
    assert isinstance(s.value, float)
    assert all(s(t) == 0.25 for t in range(0, 1000, 97))
    assert Schedule.constant(3)(5) == 3.0


def test_linear_warmup_at_exact_steps():
    s = Schedule(value=2.0, warmup=4)
    assert [s(t) for t in range(7)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert Schedule(value=1.0, warmup=10)(5) == 0.5  # the docstring example


def test_start_offset_then_warmup():
    s = Schedule(value=1.0, start=3, warmup=4)
    assert [s(t) for t in range(9)] == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_start_offset_without_warmup_jumps():
    s = Schedule(value=0.1, start=5)
    assert [s(t) for t in (0, 4, 5, 6, 100)] == [0.0, 0.0, 0.1, 0.1, 0.1]


def test_cyclical_annealing_values():
    # cycle 8, ramp 0.5: rises over 4 steps, holds for 4, then restarts at 0.
    s = Schedule(value=1.0, cycle=8, ramp=0.5)
    first = [s(t) for t in range(8)]
    assert first == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [s(t) for t in range(8, 16)] == first
    assert [s(t) for t in range(80, 88)] == first


def test_cyclical_with_start_and_full_ramp():
    s = Schedule(value=3.0, start=2, cycle=4, ramp=1.0)
    assert [s(t) for t in range(10)] == [0.0, 0.0, 0.0, 0.75, 1.5, 2.25, 0.0, 0.75, 1.5, 2.25]


def test_cycle_overrides_warmup_and_tiny_ramps_do_not_divide_by_zero():
    s = Schedule(value=1.0, warmup=1000, cycle=4, ramp=0.5)
    assert s(2) == 1.0  # the cycle's ramp (2 steps), not the 1000-step warm-up
    tiny = Schedule(value=1.0, cycle=3, ramp=0.1)  # ramp * cycle = 0.3 steps: at least one step
    assert [tiny(t) for t in range(6)] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_start_fraction_requires_resolve():
    s = Schedule(value=0.5, start_fraction=0.25)
    with pytest.raises(RuntimeError, match="resolve"):
        s(0)


def test_resolve_gives_the_right_start():
    s = Schedule(value=0.5, start_fraction=0.25, warmup=10, cycle=0, ramp=0.5)
    r = s.resolve(1000)
    assert r == Schedule(value=0.5, start=250, warmup=10)
    assert r.start_fraction is None
    assert r(249) == 0.0 and r(250) == 0.0 and r(255) == 0.25 and r(260) == 0.5
    assert s.resolve(400).start == 100
    assert Schedule(start_fraction=0.0).resolve(10).start == 0
    assert Schedule(start_fraction=0.5).resolve(0).start == 0
    # The original is frozen and unchanged.
    assert s.start_fraction == 0.25
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 3  # type: ignore[misc]


def test_resolve_keeps_every_other_field():
    s = Schedule(value=2.0, start_fraction=0.1, warmup=3, cycle=20, ramp=0.25)
    r = s.resolve(100)
    assert (r.value, r.start, r.warmup, r.cycle, r.ramp) == (2.0, 10, 3, 20, 0.25)


def test_resolve_without_fraction_is_identity():
    s = Schedule(value=1.0, start=7)
    assert s.resolve(123) is s


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"value": -0.1}, "weight"),
        ({"value": float("inf")}, "weight"),
        ({"value": float("nan")}, "weight"),
        ({"start": -1}, "start"),
        ({"warmup": -5}, "warmup"),
        ({"cycle": -2}, "cycle"),
        ({"start_fraction": 1.0}, "start_fraction"),
        ({"start_fraction": -0.1}, "start_fraction"),
        ({"ramp": 0.0}, "ramp"),
        ({"ramp": 1.5}, "ramp"),
        ({"ramp": -0.5}, "ramp"),
    ],
)
def test_invalid_fields_raise_config_error(kwargs, field):
    with pytest.raises(ConfigError) as info:
        Schedule(**kwargs)
    assert field in str(info.value)


def test_valid_edge_values():
    assert Schedule(value=0.0)(10) == 0.0
    assert Schedule(ramp=1.0, cycle=2)(1) == 0.5
    assert Schedule(start_fraction=0.0).start_fraction == 0.0
    assert Schedule(start_fraction=0.999).resolve(1000).start == 999
