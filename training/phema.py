"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2): power-function EMA profiles tracked during training, and afterwards the
least-squares combination of their stored snapshots that comes closest to any other profile.

A profile of relative standard deviation `std` ending at time t weighs the weights of time
tau <= t by (gamma + 1) / t * (tau / t)**gamma, gamma = std_to_exp(std). Times are images seen.
Equation and algorithm numbers are the paper's.
"""

import copy
import re

import numpy as np
import torch

import dnnlib

MAX_STD = 0.289  # Just above sqrt(1/12), the std of gamma = 0 (a plain average); larger has no power function.


def std_to_exp(std):
    """Exponent gamma of the profile with relative std `std` (Eq. 126, Alg. 2): the largest real
    root of gamma**3 + 7 gamma**2 + (16 - std**-2) gamma + (12 - std**-2)."""
    std = np.asarray(std, dtype=np.float64)
    roots = [np.roots([1, 7, 16 - s ** -2, 12 - s ** -2]).real.max() for s in std.ravel()]
    return np.reshape(roots, std.shape)


def power_function_beta(std, t_next, t_delta):
    """EMA decay of the step that ends at t_next and lasted t_delta (Eq. 127): following it keeps
    the average a power-function profile at every step."""
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)


def power_function_correlation(t_a, std_a, t_b, std_b):
    """Inner product of two profiles (Eq. 151, Alg. 3): the integral of their product over the
    shorter one, which only the longer profile's exponent shapes."""
    g_a, g_b = std_to_exp(std_a), std_to_exp(std_b)
    t_short, t_long = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_long = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) / t_long * (t_short / t_long) ** g_long


def _gram(t_a, std_a, t_b, std_b):
    """power_function_correlation of every pair: rows the profiles a, columns b."""
    a, b = np.broadcast_arrays(np.float64(t_a), np.float64(std_a)), np.broadcast_arrays(np.float64(t_b), np.float64(std_b))
    return power_function_correlation(a[0].reshape(-1, 1), a[1].reshape(-1, 1), b[0].reshape(1, -1), b[1].reshape(1, -1))


def solve_posthoc_coefficients(in_t, in_std, out_t, out_std):
    """Coefficients [input, output]: the least-squares combination of the input profiles closest to
    each output profile (Alg. 3), scaled to sum to one so that the average keeps its scale."""
    coefs = np.linalg.solve(_gram(in_t, in_std, in_t, in_std), _gram(in_t, in_std, out_t, out_std))
    return coefs / coefs.sum(axis=0)


def profile_error(in_t, in_std, out_t, out_std, coefs):
    """Relative L2 distance between each output profile and the combination `coefs` makes of the
    inputs: near 0 when the snapshots support the request; large with too few of them or gaps."""
    target = _gram(out_t, out_std, out_t, out_std).diagonal()
    made = np.einsum('io,ij,jo->o', coefs, _gram(in_t, in_std, in_t, in_std), coefs)
    cross = np.einsum('io,io->o', coefs, _gram(in_t, in_std, out_t, out_std))
    return np.sqrt(np.maximum(made - 2 * cross + target, 0) / target)


def parse_stds(_ctx, param, text):
    """Click callback: comma-separated relative stds, each in (0, MAX_STD) with at most three
    decimals (the snapshot names hold three)."""
    stds = [float(part) for part in (text or '').split(',') if re.fullmatch(r'\s*0?\.\d{1,3}\s*', part)]
    if text is not None and (len(stds) != len(text.split(',')) or not all(0 < std < MAX_STD for std in stds)):
        raise dnnlib.UserError(f'--{param.name.replace("_", "-")}={text}: give relative standard deviations above 0 and '
                               f'below {MAX_STD} with at most three decimals, separated by commas, such as 0.050,0.100')
    return sorted(set(stds))


class PowerFunctionEMA:
    """One averaged copy of `net` per std, each moved towards net with power_function_beta after
    every step. Every process keeps its own (the same) copies, like the classic EMA."""

    def __init__(self, net, stds):
        self.net = net
        self.emas = {std: copy.deepcopy(net).eval().requires_grad_(False) for std in stds}

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """After the step that brought the images seen to cur_nimg (the first step copies net)."""
        for std, ema in self.emas.items():
            beta = float(power_function_beta(std, cur_nimg, batch_size))
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)
