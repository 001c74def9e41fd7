"""Training code: datasets, augmentation, networks, losses, blurring maths and the loop.

Importing the package imports nothing heavy (dataset_tool's workers read images through
training.data_files without torch). Load checkpoints with `training.load_network` /
`training.load_checkpoint`: they import the modules whose classes checkpoints hold (networks,
losses, augmentation), which registers them with torch_utils.persistence, then read the file
with the safe loader of torch_utils.checkpoint.
"""


def load_checkpoint(path_or_url, **kwargs):
    """torch_utils.checkpoint.load_checkpoint with the project's classes registered: a dict of
    the file's entries, networks rebuilt as the project's classes, nothing from the file run."""
    return _checkpoint().load_checkpoint(path_or_url, **kwargs)


def load_network(path_or_url, **kwargs):
    """torch_utils.checkpoint.load_network with the project's classes registered: the network
    stored under `key` (default 'ema') of a checkpoint file or URL, in eval mode on the CPU."""
    return _checkpoint().load_network(path_or_url, **kwargs)


def _checkpoint():
    # Importing the modules registers their persistent classes.
    from . import augment, loss, networks  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    from torch_utils import checkpoint  # pylint: disable=import-outside-toplevel
    return checkpoint
