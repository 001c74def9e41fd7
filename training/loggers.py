"""Optional experiment trackers for the training loop: TensorBoard, aim, Weights & Biases.

None of them is required: each is imported only when chosen, and a missing package is one
clear error naming the pip command. Every tracker, and NoLogger (no tracker), takes the same
three calls: `log` (the per-tick statistics), `log_image` (a sample grid, HWC uint8) and `close`.
"""

import importlib
import importlib.util
import os

import dnnlib


def check_installed(kind):
    """UserError naming the pip command when the tracker `kind` ('none' or None: no tracker) is
    missing; each tracker's package is named as its --logger value."""
    if kind in LOGGERS and importlib.util.find_spec(kind) is None:
        raise dnnlib.UserError(f'--logger={kind} needs the {kind} package: pip install {kind}')


def _squeeze_grey(image):
    # PIL and the trackers take greyscale as (H, W), not (H, W, 1).
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


class TensorBoardLogger:
    def __init__(self, run_dir, **_unused):
        self.writer = importlib.import_module('torch.utils.tensorboard').SummaryWriter(run_dir)

    def log(self, stats, step):
        for name, value in stats.items():
            self.writer.add_scalar(name, value.mean, global_step=step)
        self.writer.flush()

    def log_image(self, name, image, step):
        self.writer.add_image(name, image, global_step=step, dataformats='HWC')
        self.writer.flush()

    def close(self):
        self.writer.close()


class AimLogger:
    def __init__(self, run_dir, config=None, repo='', experiment='', tag='', **_unused):
        self.aim = importlib.import_module('aim')
        self.run = self.aim.Run(repo=repo or None, experiment=experiment or os.path.basename(run_dir))
        for key, value in (config or {}).items():
            self.run[key] = value
        if tag:
            self.run.add_tag(tag)

    def log(self, stats, step):
        for name, value in stats.items():
            self.run.track(value.mean, name=name, step=step)

    def log_image(self, name, image, step):
        import PIL.Image
        self.run.track(self.aim.Image(PIL.Image.fromarray(_squeeze_grey(image))), name=name, step=step)

    def close(self):
        self.run.close()


class WandbLogger:
    def __init__(self, run_dir, config=None, project='', experiment='', tag='', **_unused):
        self.wandb = importlib.import_module('wandb')
        self.run = self.wandb.init(project=project or 'relay-diffusion', name=experiment or os.path.basename(run_dir),
                                   dir=run_dir, config=dict(config or {}), tags=[tag] if tag else None)

    def log(self, stats, step):
        self.run.log({name: value.mean for name, value in stats.items()}, step=step)

    def log_image(self, name, image, step):
        self.run.log({name: self.wandb.Image(_squeeze_grey(image))}, step=step)

    def close(self):
        self.run.finish()


class NoLogger:
    """--logger=none: takes every call and keeps nothing."""
    log = log_image = close = staticmethod(lambda *_args, **_kwargs: None)


LOGGERS = dict(tensorboard=TensorBoardLogger, aim=AimLogger, wandb=WandbLogger)


def make_logger(kind, run_dir, config=None, **logger_kwargs):
    """The tracker for --logger=`kind` ('none' or None: a NoLogger). logger_kwargs: repo (aim),
    project (wandb), experiment, tag."""
    if kind in (None, 'none'):
        return NoLogger()
    if kind not in LOGGERS:
        raise dnnlib.UserError(f'Unknown logger "{kind}"; choose one of: none, {", ".join(LOGGERS)}')
    check_installed(kind)
    return LOGGERS[kind](run_dir, config=config, **logger_kwargs)
