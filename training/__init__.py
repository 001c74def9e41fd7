"""Training code: datasets, augmentation, networks, losses, blurring maths and the loop.

Importing the package registers the persistent classes that checkpoints hold (networks, losses,
augmentation) with torch_utils.persistence, so that the checkpoint loader can rebuild them.
"""

from . import augment, loss, networks  # noqa: F401
