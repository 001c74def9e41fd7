"""Mean/covariance statistics of activations and the Frechet distance between two Gaussians.

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The ADM evaluator (and the reference) take scipy.linalg.sqrtm of the non-symmetric product S1 S2
(a complex Schur decomposition, ~30 s at 2048-d) only to read its trace. The trace is the sum of
the square roots of the eigenvalues of S1 S2, which are those of the symmetric PSD matrix
F^T S2 F for any factor S1 = F F^T (Cholesky). One factorization and one symmetric eigenvalue
computation give the same number in a fraction of the time, with no spurious imaginary parts.
"""

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

#----------------------------------------------------------------------------

def _check_stats(mu, sigma, what):
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise dnnlib.UserError(f'{what}: mean has shape {list(mu.shape)} and covariance {list(sigma.shape)}; '
                               f'expected [D] and [D, D]')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise dnnlib.UserError(f'{what}: statistics contain NaN or inf')
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    if float(np.abs(sigma - sigma.T).max(initial=0.0)) > SYMMETRY_TOL * scale:
        raise dnnlib.UserError(f'{what}: covariance is not symmetric; the file is damaged or not a covariance')
    return mu, (sigma + sigma.T) / 2  # Symmetric up to rounding; made exact, as eigh reads one triangle only.


# A covariance from a file must be symmetric positive semi-definite up to rounding: the square
# root in the distance would otherwise silently clip what is wrong (a bad file gave FID 0).
SYMMETRY_TOL = 1e-6  # Largest |S - S^T|, relative to the largest entry: float32 rounding passes.
PSD_TOL = 1e-6       # Most negative eigenvalue allowed, relative to the trace...
DATA_TOL = 1e-12     # ... plus this much of the largest squared mean (rounding of a near-zero covariance).


def _refuse_non_psd(sigma, mu, what, eigenvalues=None):
    """Refuse a covariance with an eigenvalue (given, or computed here) below minus its rounding.
    A zero covariance, of constant features, is valid."""
    slack = PSD_TOL * float(np.abs(np.diag(sigma)).sum()) + DATA_TOL * float(np.max(mu ** 2, initial=0))
    eigenvalues = np.linalg.eigvalsh(sigma) if eigenvalues is None else eigenvalues
    if eigenvalues.size and float(eigenvalues.min()) < -slack and sigma.any():
        raise dnnlib.UserError(f'{what}: covariance is not positive semi-definite; the file is damaged or not a covariance')


def frechet_distance(mu1, sigma1, mu2, sigma2, what=('sample', 'reference')):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, via eigenvalues.
    Raises dnnlib.UserError for covariances that are not symmetric PSD (within rounding)."""
    mu1, sigma1 = _check_stats(mu1, sigma1, what[0])
    mu2, sigma2 = _check_stats(mu2, sigma2, what[1])
    if mu1.shape != mu2.shape:
        raise dnnlib.UserError(f'feature dimensions differ: {mu1.shape[0]} in {what[0]}, '
                               f'{mu2.shape[0]} in {what[1]}')

    # Any factor S1 = F F^T gives eig(S1 S2) = eig(F^T S2 F): F^-1 (S1 S2) F = F^T S2 F.
    # Cholesky is the cheapest factor; a singular S1 (fewer samples than dimensions, dead
    # features) falls back to F = V sqrt(W) from the eigendecomposition. float64 LAPACK via
    # numpy (measured much faster here than torch's eigvalsh for 2048-d).
    # PSD checks come almost free: a Cholesky factor exists only for a PD S1, and with an
    # invertible F, F^T S2 F has as many negative eigenvalues as S2 (Sylvester's law of inertia).
    try:
        f = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        _refuse_non_psd(sigma1, mu1, what[0], w)
        f = v * np.sqrt(np.maximum(w, 0))  # Tiny negative eigenvalues are rounding noise.
        _refuse_non_psd(sigma2, mu2, what[1])  # F^T S2 F sees S2 only on the range of S1.
    a = f.T @ sigma2 @ f
    ev = np.linalg.eigvalsh((a + a.T) / 2)
    if ev.size and float(ev.min()) < -PSD_TOL * float(np.abs(ev).sum()):
        _refuse_non_psd(sigma2, mu2, what[1])  # Negative, or S2's rounding: S2's own check decides (again, for a singular S1).
    tr_covmean = np.sqrt(np.maximum(ev, 0)).sum()

    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


#----------------------------------------------------------------------------

class StatsAccumulator:
    """Streaming mean and covariance in float64, merged across torchrun processes.

    Each process sums (x - shift) and (x - shift)^T (x - shift) around a shift taken from its
    first batch, which avoids the cancellation of the plain E[xx^T] - mu mu^T form. finalize()
    combines processes with the parallel-variance formula (all_reduce, any rank count) and
    divides by N - 1 like np.cov.
    """

    def __init__(self, dim, device=torch.device('cpu')):
        self.dim, self.device, self.n = dim, torch.device(device), 0
        self.s1 = torch.zeros([dim], dtype=torch.float64, device=self.device)
        self.shift = torch.zeros_like(self.s1)  # The mean of the first rows, once they come.
        self.s2 = torch.zeros([dim, dim], dtype=torch.float64, device=self.device)

    def update(self, x):
        x = torch.as_tensor(x).to(self.device, torch.float64).reshape(-1, self.dim)
        if self.n == 0 and len(x):
            self.shift = x.mean(dim=0)
        xc = x - self.shift
        self.s1 += xc.sum(dim=0)
        self.s2.addmm_(xc.T, xc)
        self.n += x.shape[0]

    def finalize(self, distributed=True):
        """Returns (mu, sigma) as float64 numpy arrays. Collective when distributed."""
        reduce = distributed and torch.distributed.is_initialized()

        def total(t):  # Summed over the processes, in place.
            if reduce:
                torch.distributed.all_reduce(t)
            return t
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.device)
        mean = self.shift + self.s1 / max(self.n, 1)
        m2 = self.s2 - torch.outer(self.s1, self.s1) / max(self.n, 1)
        n_total = total(n.clone())
        if n_total.item() < 2:
            raise dnnlib.UserError(f'{int(n_total.item())} samples: need at least 2 for a covariance')
        mu = total(mean * n) / n_total
        delta = mean - mu
        sigma = total(m2 + torch.outer(delta, delta) * n) / (n_total - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def compute_statistics(features, batch_size=8192):
    """Mean and covariance (np.cov convention), float64, of an [N, D] array or of an iterable of
    its [n, D] blocks (then never held whole)."""
    if isinstance(features, np.ndarray):
        features = [features[i:i + batch_size] for i in range(0, len(features), batch_size)]  # Views, no copies.
    acc = None
    for block in features:
        acc = acc or StatsAccumulator(block.shape[1], dist.get_device())
        acc.update(torch.from_numpy(np.ascontiguousarray(block)))
    return (acc or StatsAccumulator(0)).finalize(distributed=False)  # Refuses fewer than 2 rows.

#----------------------------------------------------------------------------
