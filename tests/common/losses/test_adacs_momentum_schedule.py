"""The AdaCS smoothness weight ``m_T`` (Eq. 5-7) with realistic residual magnitudes (issue 17, point 1).

On [0, 1] images a registration's mean squared residual is ~0.005-0.02 (the identity residual of the synthetic ACDC
default is 0.016 on average; it falls to a few 1e-3 once registered). The paper's ``cos(π/2 · μ)`` is then ≈ 1 and
``m_T`` jumps to ≈ 1 at the first update; the authors' scaled form must instead make ``m_T`` rise over training.
The reference below recomputes the schedule with NumPy from the equations, independently of the class.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from common.losses.adacs import MomentumTVWeight

EPOCHS, STEPS = 40, 12


def _realistic_residuals(seed: int = 0) -> list[tuple[float, int]]:
    """``(μ, epoch)`` per displacement step: 0.018 at the start decaying to ~0.004, with ±15 % batch noise."""
    rng = np.random.default_rng(seed)
    out = []
    for epoch in range(EPOCHS):
        level = 0.004 + 0.014 * math.exp(-epoch / 8.0)
        out += [(float(level * rng.uniform(0.85, 1.15)), epoch) for _ in range(STEPS)]
    return out


def _reference(schedule: list[tuple[float, int]], scale: float, clip: bool, epoch_mean: bool) -> np.ndarray:
    """``m`` after every update, from Eq. 5-7 with the options spelled out (float64)."""
    m, values, seen = 0.0, [], {}
    for mu, epoch in schedule:
        seen.setdefault(epoch, []).append(mu)
        mu_t = np.mean(seen[epoch]) if epoch_mean else mu
        arg = scale * mu_t
        b = np.cos(np.pi / 2 * (np.minimum(arg, 1.0) if clip else arg))
        gamma = min(1.0 - 1.0 / (epoch + 1), 0.99)
        m = gamma * m + (1.0 - gamma) * b
        values.append(m)
    return np.asarray(values)


def _end_of_epoch(values: list[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values).reshape(EPOCHS, STEPS)[:, -1]


def test_paper_form_is_inert_for_realistic_residuals():
    """Documents the issue: with the paper's Eq. 6 unscaled, m is ≈ 1 after one update and never moves."""
    schedule = _realistic_residuals()
    paper = MomentumTVWeight()  # residual_scale=1, per-step μ: Eq. 5-7 as printed
    values = [paper.update(mu, epoch) for mu, epoch in schedule]
    assert values[0] > 0.999
    assert np.ptp(values) < 1e-3
    np.testing.assert_allclose(values, _reference(schedule, 1.0, True, False), rtol=0, atol=1e-12)


def test_scaled_form_rises_gradually_over_training():
    schedule = _realistic_residuals()
    mom = MomentumTVWeight(residual_scale=100.0, clip=True, average="epoch")  # the bundle's setting
    values = [mom.update(mu, epoch) for mu, epoch in schedule]
    np.testing.assert_allclose(values, _reference(schedule, 100.0, True, True), rtol=0, atol=1e-12)
    per_epoch = _end_of_epoch(values)
    # weak early: μ ≈ 0.018 > 1/scale, so b = 0 and m stays 0 (not ≈ 1) after the first update and the first epoch
    assert values[0] < 0.05 and per_epoch[0] < 0.05
    # then it grows as the residual falls: rising from epoch to epoch, well below its final level half-way through
    assert np.all(np.diff(per_epoch) > -0.01)  # batch noise aside
    assert per_epoch[5] < 0.5 * per_epoch[-1] and per_epoch[10] < per_epoch[20] < per_epoch[-1]
    # strong late: μ ≈ 0.004-0.0045 gives b = cos(π/2 · 0.4-0.45) ≈ 0.76-0.81
    assert 0.7 < per_epoch[-1] < 0.85
    assert mom.epoch_mean == pytest.approx(np.mean([mu for mu, e in schedule if e == EPOCHS - 1]), rel=1e-12)


def test_clip_keeps_the_weight_non_negative():
    # above μ = 1/scale the authors' unclipped cosine is negative: a negative smoothness weight would reward rough maps
    clipped, unclipped = MomentumTVWeight(residual_scale=100.0), MomentumTVWeight(residual_scale=100.0, clip=False)
    assert clipped.update(0.02, 0) == pytest.approx(0.0, abs=1e-12)
    assert unclipped.update(0.02, 0) == pytest.approx(math.cos(math.pi), abs=1e-12)  # -1
    assert clipped.activation(0.005) == unclipped.activation(0.005) == pytest.approx(math.cos(math.pi / 4))
    with pytest.raises(ValueError, match="average must be one of"):
        MomentumTVWeight(average="batch")


def test_epoch_mean_state_resumes_mid_epoch_identically():
    rng = np.random.default_rng(1)
    # residuals below 1/scale, where b depends on the running mean (above it every b is clipped to 0)
    schedule = [(float(mu), epoch) for epoch in range(3) for mu in rng.uniform(0.002, 0.009, size=STEPS)]
    reference = MomentumTVWeight(residual_scale=100.0, average="epoch")
    ref_values = [reference.update(mu, epoch) for mu, epoch in schedule]
    cut = STEPS + 5  # in the middle of epoch 1: the running mean must travel with the checkpoint
    first = MomentumTVWeight(residual_scale=100.0, average="epoch")
    for mu, epoch in schedule[:cut]:
        first.update(mu, epoch)
    buffer = io.BytesIO()
    torch.save({"momentum": first.state_dict()}, buffer)
    buffer.seek(0)
    resumed = MomentumTVWeight(residual_scale=100.0, average="epoch")
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["momentum"])
    assert [resumed.update(mu, epoch) for mu, epoch in schedule[cut:]] == ref_values[cut:]
    # without the running mean (a checkpoint of the older format) the continuation differs: the test can fail
    old_format = MomentumTVWeight(residual_scale=100.0, average="epoch")
    old_format.load_state_dict({"m": first.m, "num_updates": first.num_updates})
    assert [old_format.update(mu, epoch) for mu, epoch in schedule[cut:]] != ref_values[cut:]
