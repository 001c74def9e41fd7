"""Inception Score as in the ADM evaluator (after improved-GAN): softmax of the detector's
1008 logits, exp(mean KL(p(y|x) || p(y))) per split of 5000 samples, then the mean over splits
(the last split may be shorter, as there).

Logits follow ADM and the original TF code: pool3 features times the softmax weight matrix,
WITHOUT the bias. (The reference RDM evaluate.py calls the detector's output layer, which adds
the bias; `evaluate.py calc --is-bias` reproduces that.)
"""

import numpy as np
import torch


def inception_score(logits, split_size=5000):
    """IS of finite [N, classes] logits, or of an iterable of its splits (read one at a time), as
    activations.FeatureSet.features gives them."""
    if isinstance(logits, np.ndarray):
        logits = [logits[i:i + split_size] for i in range(0, len(logits), split_size)]  # Views, no copies.
    scores = []
    for split in logits:
        log_p = torch.log_softmax(torch.from_numpy(np.asarray(split, dtype=np.float64)), dim=1)
        log_mean = torch.logsumexp(log_p, dim=0) - np.log(len(split))  # log of mean p over the split
        scores.append(float(torch.exp((log_p.exp() * (log_p - log_mean[None, :])).sum(dim=1).mean())))
    return float(np.mean(scores))
