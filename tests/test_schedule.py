"""The learning-rate schedule (specfast/train/schedule.py): warmup as a share of the budget, decay
after warmup, step-boxed and time-boxed, and the old shape still selectable."""

import math

import pytest

from specfast.train.config import TrainConfig
from specfast.train.schedule import Schedule, lr_factor


def _run(s: Schedule, steps: int, step_seconds: float = 1.0) -> list[float]:
    """Factors of a run of `steps` updates taking `step_seconds` each."""
    return [s.factor(i, i * step_seconds) for i in range(steps)]


def _check_shape(f: list[float], warmup_updates: int, min_ratio: float, cliff=0.3) -> None:
    peak = max(range(len(f)), key=f.__getitem__)
    assert abs(peak - warmup_updates) <= 1, (peak, warmup_updates)
    assert f[0] > 0
    assert all(a < b for a, b in zip(f[:peak], f[1 : peak + 1])), "warmup rises"
    assert f[peak] == pytest.approx(1.0, abs=0.02)
    assert all(a >= b for a, b in zip(f[peak:], f[peak + 1 :])), "decays after warmup"
    assert f[-1] == pytest.approx(min_ratio, abs=0.02)
    assert max(abs(a - b) for a, b in zip(f, f[1:])) < cliff, "no cliff"


def test_step_boxed_warmup_fraction_then_decay():
    s = Schedule(max_steps=200, warmup=0.1, min_ratio=0.1)
    f = _run(s, 200)
    _check_shape(f, 19, 0.1)
    assert f[0] == pytest.approx(1 / 20)  # (step 1 of 200) / (20 warmup steps)
    assert f[19] == pytest.approx(1.0)
    # Halfway through the decay, the cosine is at its midpoint.
    mid = 19 + (200 - 19) // 2
    assert f[mid] == pytest.approx(0.55, abs=0.02)


def test_time_boxed_warmup_is_a_share_of_the_minutes():
    # ~76 steps of 1 s in a 76 s budget, max_steps far away: the budget is time.
    s = Schedule(max_steps=1000, max_seconds=76.0, warmup=0.05, min_ratio=0.1)
    f = _run(s, 76)
    _check_shape(f, math.ceil(0.05 * 76), 0.1)
    # The same budget in steps gives the same curve.
    g = _run(Schedule(max_steps=76, warmup=0.05, min_ratio=0.1), 76)
    assert max(abs(a - b) for a, b in zip(f[1:], g)) < 0.05
    # Slower steps: fewer of them (warmup is then under two steps), the same shape over the minutes.
    h = _run(Schedule(max_steps=1000, max_seconds=76.0, warmup=0.05, min_ratio=0.1), 25, 3.04)
    _check_shape(h, 1, 0.1, cliff=0.8)


def test_time_boxed_run_that_hits_max_steps_first():
    s = Schedule(max_steps=50, max_seconds=3600.0, warmup=0.1)
    _check_shape(_run(s, 50, 1.0), 4, 0.1)


def test_no_warmup_starts_at_the_peak():
    f = _run(Schedule(max_steps=10, warmup=0.0, min_ratio=0.0), 10)
    assert f[0] == pytest.approx(math.cos(math.pi * 0.1) * 0.5 + 0.5)
    assert f[-1] == pytest.approx(0.0)


def test_legacy_steps_shape_is_kept_and_shows_the_cliff():
    # Step-boxed: exactly the old trainer's formula.
    s = Schedule(max_steps=300, kind="steps", warmup_steps=50, min_ratio=0.1)
    for step in (0, 10, 49, 50, 51, 200, 299):
        progress = (step - 50) / (300 - 50)
        assert s.factor(step, 0.0) == lr_factor(step, 50, progress, 0.1)
    # Time-boxed with the old defaults and ~76 steps: warmup for two thirds of the run, then the
    # rate falls from the peak to about a third of it in one step (issue 11, finding 2).
    t = Schedule(max_steps=1000, max_seconds=76.0, kind="steps", warmup_steps=50, min_ratio=0.1)
    f = _run(t, 76)
    assert f[49] == pytest.approx(1.0)
    assert 0.25 < f[50] < 0.4
    # The new default over the same run has no such step.
    g = _run(Schedule(max_steps=1000, max_seconds=76.0), 76)
    assert max(abs(a - b) for a, b in zip(g, g[1:])) < 0.3


def test_from_config_and_validation():
    cfg = TrainConfig(data="x", max_steps=100, max_minutes=2.0, warmup=0.2, min_lr_ratio=0.0)
    s = Schedule.from_config(cfg)
    assert (s.kind, s.max_seconds, s.warmup, s.min_ratio) == ("fraction", 120.0, 0.2, 0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        Schedule(max_steps=10, kind="linear")
    with pytest.raises(ValueError, match="warmup"):
        Schedule(max_steps=10, warmup=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        Schedule(max_steps=0)
    with pytest.raises(ValueError, match="config: warmup"):
        TrainConfig(data="x", warmup=-0.1).validate()
    with pytest.raises(ValueError, match="config: lr_schedule"):
        TrainConfig(data="x", lr_schedule="cosine").validate()
