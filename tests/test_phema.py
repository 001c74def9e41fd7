"""Post-hoc EMA maths (training/phema.py) against a restatement of EDM2's, and a reconstruction of
a known weight trajectory against the power-function EMA run directly."""

import math

import numpy as np
import pytest
import scipy.integrate
import torch

import dnnlib
from training import phema
from reference_restatement import (ref_power_function_beta, ref_power_function_correlation, ref_solve_posthoc_coefficients,
                                   ref_std_to_exp)

STDS = [0.005, 0.01, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.288]
# (snapshots, images between them, tracked stds): tiny CPU runs to EDM2-sized ones.
SCHEDULES = [(3, 8, [0.05, 0.1]), (20, 4096 * 1000, [0.05, 0.1]), (10, 1000, [0.03]), (37, 2500 * 1000, [0.02, 0.06, 0.13])]


def _schedule(count, every, tracked):
    return np.repeat(np.arange(1, count + 1) * every, len(tracked)).astype(np.float64), np.tile(tracked, count)


def test_profile_functions_equal_edm2s():
    for std in STDS:
        assert phema.std_to_exp(std) == pytest.approx(ref_std_to_exp(std), rel=1e-12)
        gamma = phema.std_to_exp(std)
        assert math.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3)) == pytest.approx(std, rel=1e-9)  # Eq. 123 inverted.
        for t_next, t_delta in [(8, 4), (4096, 4096), (1e6, 512), (2e9, 4096)]:
            assert phema.power_function_beta(std, t_next, t_delta) == pytest.approx(ref_power_function_beta(std, t_next, t_delta), abs=1e-12)
    assert phema.std_to_exp(np.array([[0.05, 0.1]])).shape == (1, 2)
    rng = np.random.default_rng(0)
    t_a, t_b, s_a, s_b = rng.uniform(1, 1e6, 40), rng.uniform(1, 1e6, 40), rng.uniform(0.01, 0.28, 40), rng.uniform(0.01, 0.28, 40)
    t_b[:5] = t_a[:5]
    ours = phema.power_function_correlation(t_a, s_a, t_b, s_b)
    ref = [ref_power_function_correlation(*args) for args in zip(t_a, s_a, t_b, s_b)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_correlation_is_the_integral_of_the_profiles():
    # Eq. 151 against quadrature of the profiles themselves: (g + 1) / t * (tau / t)**g on [0, t].
    profile = lambda tau, t, std: (phema.std_to_exp(std) + 1) / t * (tau / t) ** phema.std_to_exp(std)  # noqa: E731
    for t_a, s_a, t_b, s_b in [(1.0, 0.05, 1.0, 0.1), (0.6, 0.07, 1.0, 0.2), (1.0, 0.15, 0.3, 0.03), (2.0, 0.1, 2.0, 0.1)]:
        quad = scipy.integrate.quad(lambda tau: profile(tau, t_a, s_a) * profile(tau, t_b, s_b), 0, min(t_a, t_b), epsabs=0, epsrel=1e-12, limit=200)[0]
        assert phema.power_function_correlation(t_a, s_a, t_b, s_b) == pytest.approx(quad, rel=1e-8)


@pytest.mark.parametrize('count,every,tracked', SCHEDULES)
def test_coefficients_equal_edm2s(count, every, tracked):
    in_t, in_std = _schedule(count, every, tracked)
    for out_t in (in_t[-1], in_t[len(in_t) // 2]):
        keep = in_t <= out_t
        out_std = [0.01, 0.07, 0.12, 0.2] + tracked
        ours = phema.solve_posthoc_coefficients(in_t[keep], in_std[keep], out_t, out_std)
        ref = ref_solve_posthoc_coefficients(in_t[keep], in_std[keep], [out_t] * len(out_std), out_std)
        assert ours.shape == (keep.sum(), len(out_std))
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9 * max(1, np.abs(ref).max()))
        np.testing.assert_allclose(ours.sum(axis=0), 1, atol=1e-12)
        # A tracked std at a stored time is that snapshot, exactly made.
        for j, std in enumerate(tracked, start=4):
            index = np.flatnonzero(keep & (in_t == out_t) & (in_std == std))[0]
            assert ours[index, j] == pytest.approx(1, abs=1e-6)
        errors = phema.profile_error(in_t[keep], in_std[keep], out_t, out_std, ours)
        assert np.all(errors[4:] < 1e-6) and np.all(errors[:4] > 1e-6)


def test_profile_error_grows_with_fewer_snapshots():
    errors = []
    for count in (1, 4, 16, 64):
        in_t, in_std = _schedule(count, 1000, [0.05, 0.1])
        coefs = phema.solve_posthoc_coefficients(in_t, in_std, in_t[-1], [0.15])
        errors.append(float(phema.profile_error(in_t, in_std, in_t[-1], [0.15], coefs)[0]))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.2 and errors[-1] < 1e-3


#----------------------------------------------------------------------------
# A weight trajectory known in closed form, tracked and reconstructed.

def _trajectory(step):
    """16 weights moving smoothly (drift plus oscillations of several periods) over 2000 steps."""
    k = torch.arange(16, dtype=torch.float64)
    return torch.sin(step / 2000 * (1 + k) * 3 + k) + step / 2000 * (k - 8) / 8


def _run(stds, snapshot_every, steps=2000, batch=8):
    """Power-function EMAs of the trajectory, stored every `snapshot_every` steps: [(nimg, std, weights)]."""
    net = torch.nn.Linear(16, 1, bias=False).double()
    tracker = phema.PowerFunctionEMA(net, stds)
    stored = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.weight.copy_(_trajectory(step)[None])
        tracker.update(step * batch, batch)
        if step % snapshot_every == 0:
            stored += [(step * batch, std, ema.weight[0].clone()) for std, ema in tracker.emas.items()]
    return stored


def test_tracker_follows_the_power_function_beta():
    net = torch.nn.Linear(3, 1, bias=False).double()
    tracker = phema.PowerFunctionEMA(net, [0.05, 0.1])
    expected = {0.05: None, 0.1: None}
    for step in range(1, 6):
        with torch.no_grad():
            net.weight.normal_()
        tracker.update(step * 4, 4)
        for std in expected:
            beta = ref_power_function_beta(std, step * 4, 4)
            w = net.weight.detach().clone()
            expected[std] = w if expected[std] is None else beta * expected[std] + (1 - beta) * w
            torch.testing.assert_close(tracker.emas[std].weight, expected[std], rtol=1e-12, atol=1e-12)
    assert beta > 0 and not tracker.emas[0.05].weight.requires_grad and net.weight.requires_grad


def test_reconstruction_approaches_the_directly_run_ema():
    # Stds 0.07 and 0.15 are not tracked; their EMAs run directly are the truth. The error is
    # relative to how far that EMA is from the final weights (what the averaging changes).
    direct = {std: w for _nimg, std, w in _run([0.07, 0.15], 2000)}
    final = _trajectory(2000)
    errors = {}
    for every in (500, 100, 20):
        stored = _run([0.05, 0.1], every)
        coefs = phema.solve_posthoc_coefficients([s[0] for s in stored], [s[1] for s in stored], 2000 * 8, [0.07, 0.15])
        for j, std in enumerate([0.07, 0.15]):
            made = sum(float(c) * s[2] for c, s in zip(coefs[:, j], stored))
            errors[every, std] = float((made - direct[std]).norm() / (direct[std] - final).norm())
    print('relative errors (snapshot every N steps, std):', {k: f'{v:.2e}' for k, v in errors.items()})
    for std in (0.07, 0.15):
        assert errors[500, std] > errors[100, std] > errors[20, std]
    assert errors[500, 0.15] > 0.02 and errors[100, 0.15] < 1e-3 and errors[20, 0.07] < 1e-5 and errors[20, 0.15] < 1e-5


@pytest.mark.parametrize('text', ['0', '-0.05', '0.3', 'nan', 'inf', '0.0505', 'a', '', '0.05,,0.1'])
def test_bad_stds_are_refused(text):
    with pytest.raises(dnnlib.UserError, match='--ema-std=.*three decimals'):
        phema.parse_stds(None, type('P', (), {'name': 'ema_std'}), text)


def test_stds_are_sorted_and_unique():
    assert phema.parse_stds(None, None, '0.100,0.05,0.1') == [0.05, 0.1]
    assert phema.parse_stds(None, None, None) == []
