"""Improved precision and recall (Kynkaanniemi et al. 2019) as in the ADM evaluator.

Each feature set estimates a manifold: the union of balls around its points, the radius of a
point being the squared distance to its k-th nearest neighbour (k=3; the point itself counts
as the 0th). Precision = fraction of samples inside the reference manifold; recall = fraction
of reference points inside the sample manifold; a point is inside a ball when d <= r.

The reference (RDM's evaluate.py) computes this in numpy float64: distance blocks, then
np.partition per chunk, radii stored as float32. (ADM's TF evaluator first tries float16
distances, so its decisions near a tie are not reproducible by any exact computation.) We give
the reference's float64 decisions, faster:
  - squared distances in float32, one matmul per block (GPU when present); the k-NN radii pass
    visits only the upper triangle of blocks (the distance matrix is symmetric);
  - a rigorous bound on the float32 error, so almost every decision is already certain;
  - the rest are recomputed in float64 with the reference's own expansion
    |u|^2 - 2 u.v + |v|^2, using exact radii that are computed only where needed.
Memory stays bounded by the block size. The float32 copies are shifted by the reference mean
(distances are unchanged; smaller norms give a tighter bound).
"""

import math

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

class _FeatureSet:
    """One feature set. Screening uses a float32 copy shifted by a common vector (distances do
    not change; smaller norms mean a tighter error bound); exact recomputation uses the
    original values in float64 with the reference's formula."""

    def __init__(self, x, shift, device, chunk=8192):
        (self.n, self.dim), self.device = x.shape, device
        self.src = torch.from_numpy(np.ascontiguousarray(x))  # Host, original dtype.
        f32 = np.empty(x.shape, dtype=np.float32)
        for a in range(0, self.n, chunk):
            f32[a:a + chunk] = x[a:a + chunk].astype(np.float64) - shift
        self.f32 = torch.from_numpy(f32).to(device)
        self.sq64 = torch.cat([(self.f32[a:a + chunk].double() ** 2).sum(1) for a in range(0, self.n, chunk)])
        self.sq32 = self.sq64.to(torch.float32)
        self.nrm64 = torch.from_numpy(np.einsum('ij,ij->i', x, x, dtype=np.float64)).to(device)  # Unshifted.
        # Per-point share of the float32 error bound: |D32 - D64| <= coef * (|u|^2 + |v|^2) for
        # D = |u|^2 - 2 u.v + |v|^2, counting the cast of the features to float32, a dot product of
        # `dim` terms in any summation order and the final additions: about (dim + 12) ulps; twice that for headroom.
        self.t = (2 * self.dim + 24) * 2.0 ** -24 * self.sq64
        self.t_max = self.t.max().item()

    def rows64(self, idx):
        return self.src.index_select(0, torch.as_tensor(idx).cpu()).to(self.device, torch.float64)


def _sqdist32(a, b, a0, a1, b0, b1):
    d = torch.addmm(a.sq32[a0:a1, None], a.f32[a0:a1], b.f32[b0:b1].T, alpha=-2)
    return d.add_(b.sq32[None, b0:b1]).clamp_(min=0)


def _sqdist64(a, rows_a, u, b, rows_b, v):
    # The reference's expansion, in float64: (|u|^2 - 2 u.v) + |v|^2, clamped at zero.
    d = torch.addmm(a.nrm64[rows_a][:, None], u, v.T, alpha=-2)
    return d.add_(b.nrm64[rows_b][None, :]).clamp_(min=0)

#----------------------------------------------------------------------------

def _merge_smallest(best_v, best_i, new_v, new_i, m):
    v, pos = torch.cat([best_v, new_v], dim=1).topk(m, dim=1, largest=False, sorted=True)
    return v, torch.gather(torch.cat([best_i, new_i], dim=1), 1, pos)


class _Radii:
    """k-NN radii of one set. The float32 pass gives r32 (within `slack` of the exact value for
    every row) and the m nearest candidates per row; exact values, rounded to float32 as the
    reference stores them, are computed only for the rows that a decision needs."""

    def __init__(self, fs, k, block, num_candidates=8):
        self.fs, self.k, self.block = fs, k, block
        n, dev = fs.n, fs.device
        self.m = m = min(max(num_candidates, k + 1), n)
        self.best_v = best_v = torch.full([n, m], float('inf'), dtype=torch.float32, device=dev)
        self.best_i = best_i = torch.zeros([n, m], dtype=torch.int64, device=dev)
        # Upper triangle of blocks only: each distance block serves its rows and its columns.
        for r0 in range(0, n, block):
            r1 = min(r0 + block, n)
            for c0 in range(r0, n, block):
                c1 = min(c0 + block, n)
                d = _sqdist32(fs, fs, r0, r1, c0, c1)
                v, i = d.topk(min(m, c1 - c0), dim=1, largest=False, sorted=False)
                best_v[r0:r1], best_i[r0:r1] = _merge_smallest(best_v[r0:r1], best_i[r0:r1], v, i + c0, m)
                if c0 != r0:
                    v, i = d.topk(min(m, r1 - r0), dim=0, largest=False, sorted=False)
                    best_v[c0:c1], best_i[c0:c1] = _merge_smallest(best_v[c0:c1], best_i[c0:c1], v.T, i.T + r0, m)
        self.r32 = best_v[:, k].double()
        # k-th order statistics move by at most the largest element error: |r32 - r| <= t_i + t_max;
        # rounding r to float32 adds half an ulp (we allow one).
        self.slack = fs.t + fs.t_max + self.r32.abs() * 2.0 ** -23
        self.exact = torch.full([n], float('nan'), dtype=torch.float64, device=dev)
        self.known = torch.zeros([n], dtype=torch.bool, device=dev)
        self.num_exact = self.num_full_rows = 0

    def get(self, rows):
        """Exact (float32-rounded) radii of `rows` (1-D index tensor)."""
        rows = torch.as_tensor(rows, device=self.fs.device)
        todo = rows[~self.known[rows]].unique()
        fs, k, m = self.fs, self.k, self.m
        chunk = max(1, (1 << 23) // (m * fs.dim))
        for q0 in range(0, len(todo), chunk):
            r = todo[q0:q0 + chunk]
            u = fs.rows64(r)
            cand = self.best_i[r]
            w = fs.rows64(cand.reshape(-1)).reshape(len(r), m, -1)
            d = (fs.nrm64[r][:, None] - 2 * torch.einsum('nd,nmd->nm', u, w) + fs.nrm64[cand]).clamp_(min=0)
            kth = d.sort(dim=1).values[:, k]
            # Exact only if no point outside the candidates can be closer than kth: every such
            # point has D32 >= the largest candidate's D32.
            safe = ((self.best_v[r, -1].double() - fs.t[r] - fs.t_max) >= kth) | (m == fs.n)
            for i in (~safe).nonzero().flatten().tolist():  # Rare: whole row in float64.
                kth[i] = self._full_row(int(r[i]))
                self.num_full_rows += 1
            self.exact[r] = kth.to(torch.float32).to(torch.float64)  # The reference keeps float32.
            self.known[r] = True
            self.num_exact += len(r)
        return self.exact[rows]

    def _full_row(self, row):
        fs, u = self.fs, self.fs.rows64([row])
        d = [_sqdist64(fs, [row], u, fs, idx.to(fs.device), fs.rows64(idx))[0] for idx in torch.arange(fs.n).split(self.block)]
        return torch.cat(d).kthvalue(self.k + 1).values


def _settle(a, rows, b, radii_b, block):
    """Exact decisions for points `rows` of set a: inside some ball of set b?"""
    hit = torch.zeros([len(rows)], dtype=torch.bool, device=a.device)
    u = a.rows64(rows)
    r32, slack = radii_b.r32, radii_b.slack
    for idx in torch.arange(b.n, device=a.device).split(block):
        d = _sqdist64(a, rows, u, b, idx, b.rows64(idx))  # [rows, block]
        lo, hi = (r32 - slack)[None, idx], (r32 + slack)[None, idx]
        hit |= (d <= lo).any(dim=1)
        near = (d > lo) & (d <= hi)  # Needs the exact radius of that ball.
        if near.any():
            q, j = near.nonzero(as_tuple=True)
            hit[q[d[q, j] <= radii_b.get(idx[j])]] = True
    return hit


def _evaluate_pr(ref, radii_ref, smp, radii_smp, block):
    """(precision, recall, info): samples inside some reference ball, reference points inside
    some sample ball, with d <= r as in the reference."""
    r_ref32, r_smp32 = radii_ref.r32.to(torch.float32), radii_smp.r32.to(torch.float32)
    # Running minima over the other set of D32 - r32, for each side.
    smp_min, ref_min = (torch.full([fs.n], float('inf'), device=fs.device) for fs in (smp, ref))
    for r0 in range(0, ref.n, block):
        r1 = min(r0 + block, ref.n)
        for c0 in range(0, smp.n, block):
            c1 = min(c0 + block, smp.n)
            d = _sqdist32(ref, smp, r0, r1, c0, c1)
            smp_min[c0:c1] = torch.minimum(smp_min[c0:c1], (d - r_ref32[r0:r1, None]).amin(dim=0))
            ref_min[r0:r1] = torch.minimum(ref_min[r0:r1], d.sub_(r_smp32[None, c0:c1]).amin(dim=1))

    # Decided by float32 alone when the margin exceeds the distance error (t_max of the other
    # set + own t) plus the radius slack (at most 2 t_max + one ulp of the largest radius).
    def decide(own, own_min, other, radii_other):
        band = own.t + 3 * other.t_max + radii_other.r32.abs().max() * 2.0 ** -23
        own_min = own_min.double()
        inside = own_min <= -band
        ambiguous = ((own_min <= band) & ~inside).nonzero().flatten()
        for rows in ambiguous.split(1024):
            inside[rows] = _settle(own, rows, other, radii_other, block)
        return inside, len(ambiguous)

    smp_in, n_smp_amb = decide(smp, smp_min, ref, radii_ref)
    ref_in, n_ref_amb = decide(ref, ref_min, smp, radii_smp)
    info = dict(ambiguous_samples=n_smp_amb, ambiguous_refs=n_ref_amb,
                exact_radii=radii_ref.num_exact + radii_smp.num_exact,
                full_rows=radii_ref.num_full_rows + radii_smp.num_full_rows)
    return smp_in.double().mean().item(), ref_in.double().mean().item(), info


def precision_recall(ref_feats, sample_feats, k=3, block=4096, device=None, return_info=False):
    """ADM's compute_prec_recall(ref, sample): returns (precision, recall) as Python floats. The
    features are [N, D] arrays of finite numbers of equal D, as compute.compute_metrics checks them."""
    for what, feats in (('reference', ref_feats), ('sample', sample_feats)):
        if len(feats) <= k:
            raise dnnlib.UserError(f'{what}: {len(feats)} samples; need at least {k + 1}')
    # Scaling both sets by a power of two changes no decision and, in floating point, no rounding.
    # Far from 1 (features x 1e20, or x 1e-20), one that brings the largest magnitude near 1 keeps
    # every squared distance within float32's range (the reference's float32 radii would overflow).
    top = max(float(np.abs(ref_feats).max()), float(np.abs(sample_feats).max()))
    if not 2.0 ** -32 <= top <= 2.0 ** 32 and top > 0:
        scale = 2.0 ** -math.floor(math.log2(top))
        ref_feats, sample_feats = ref_feats * scale, sample_feats * scale
    device = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
    shift = ref_feats.mean(axis=0, dtype=np.float64)
    # TF32 / bf16 float32 matmul modes would void the error bound: true float32 here ('highest'
    # also turns torch.backends.cuda.matmul.allow_tf32 off; restoring the mode restores it).
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('highest')
    try:
        with torch.no_grad():
            ref, smp = _FeatureSet(ref_feats, shift, device), _FeatureSet(sample_feats, shift, device)
            radii_ref, radii_smp = _Radii(ref, k, block), _Radii(smp, k, block)
            precision, recall, info = _evaluate_pr(ref, radii_ref, smp, radii_smp, block)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    return (precision, recall, info) if return_info else (precision, recall)

#----------------------------------------------------------------------------
