"""Inception Score as in the ADM evaluator (after improved-GAN): softmax of the detector's
1008 logits, exp(mean KL(p(y|x) || p(y))) per split of 5000 samples, then the mean over splits
(the last split may be shorter, as there).

Logits follow ADM and the original TF code: pool3 features times the softmax weight matrix,
WITHOUT the bias. (The reference RDM evaluate.py calls the detector's output layer, which adds
the bias; `include_bias` in metrics.detector reproduces that if ever needed.)
"""

import numpy as np
import torch

import dnnlib


def inception_score(logits, split_size=5000):
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise dnnlib.UserError(f'logits have shape {list(logits.shape)}; expected [N, classes] with N >= 1')
    if not np.isfinite(logits).all():
        raise dnnlib.UserError('logits contain NaN or inf')
    scores = []
    for begin in range(0, logits.shape[0], split_size):
        part = torch.from_numpy(np.asarray(logits[begin:begin + split_size], dtype=np.float64))
        log_p = torch.log_softmax(part, dim=1)
        log_mean = torch.logsumexp(log_p, dim=0) - np.log(part.shape[0])  # log of mean p over the split
        kl = (log_p.exp() * (log_p - log_mean[None, :])).sum(dim=1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores))
