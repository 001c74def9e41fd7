"""Kernel Inception Distance (Binkowski et al. 2018) as torch-fidelity computes it.

Unbiased MMD^2 estimate with the polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
`num_subsets` (100) random subsets of `subset_size` (1000) rows drawn without replacement from each
set. The subsets come from numpy.random.RandomState(seed=2020): for each subset first the sample
rows, then the reference rows, as torch-fidelity draws them (its input_1, input_2). Computed in
float64; returns (mean, std) over the subsets (np.std, ddof=0).
"""

import numpy as np

import dnnlib

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
# More subsets than this is a typo (torch-fidelity uses 100); each costs a subset_size^2 kernel.
KID_MAX_SUBSETS = 100_000


def polynomial_mmd2(x, y, degree=3, coef0=1):
    """Unbiased MMD^2 between two equal-size row sets, polynomial kernel with gamma = 1/d."""
    m, d = x.shape
    kernel = lambda a, b: (a @ b.T * (1.0 / d) + coef0) ** degree  # noqa: E731
    k_xx, k_yy = kernel(x, x), kernel(y, y)
    off_diagonal = (k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))
    return off_diagonal / (m * (m - 1)) - 2 * kernel(x, y).sum() / (m * m)


def kernel_inception_distance(sample, ref, num_subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=KID_SEED):
    """(KID mean, KID std) of sample features [N, D] against reference features [M, D], finite and of
    equal D (as compute.compute_metrics checks them); subset_size >= 2, num_subsets >= 1."""
    if min(len(sample), len(ref)) < subset_size:
        raise dnnlib.UserError(f'KID subset size {subset_size} exceeds the number of samples ({len(sample)} sample, '
                               f'{len(ref)} reference); pass a smaller --kid-subset-size')
    rng = np.random.RandomState(seed)
    pick = lambda x: x[rng.choice(len(x), subset_size, replace=False)].astype(np.float64)  # noqa: E731
    mmds = [polynomial_mmd2(pick(sample), pick(ref)) for _ in range(num_subsets)]  # Sample rows drawn first, as there.
    return float(np.mean(mmds)), float(np.std(mmds))
