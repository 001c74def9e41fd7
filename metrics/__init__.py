"""Evaluation metrics of the ADM evaluator protocol: FID, sFID, Inception Score, precision/recall.

Modules:
    inception.py          TF-faithful Inception-v3 (2015-12-05 graph) for pytorch-fid's weights file.
    detector.py           load a detector (NVIDIA's pickle or our module) -> feat, s_feat, logits.
    activations.py        image sources, sharded extraction, activation/statistics files.
    frechet.py            streaming mean/covariance and the Frechet distance.
    precision_recall.py   k-NN manifold precision/recall (k=3), exact and batched in torch.
    inception_score.py    Inception Score from logits (splits of 5000).
    kid.py                Kernel Inception Distance (torch-fidelity's subsets and polynomial kernel).
    dinov2.py             DINOv2 ViT-L/14 detector for FD-DINOv2 (EDM2's preprocessing).
    refs.py               named published reference sets, downloaded once into the cache.
    compute.py            the metrics of two feature sets (files or arrays), as evaluate.py prints them.
"""
