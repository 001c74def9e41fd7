"""Samples while training: a small fixed-seed grid of the EMA network, one PNG per snapshot.

First stage: EDM's sampler (`training.sampling`, its defaults but `num_steps`) from the seeds'
latents, class labels seed % label_dim as generate.py. Second stage (BlurLoss): the relay from
real dataset images, downsampled by `up_scale` and upsampled back (nearest), as a first-stage
output would be; the PNG shows those inputs above the relay's outputs. The same seeds and the
same images every time, so the grids of one run are comparable.

The grid never touches the training's random streams: every draw comes from per-seed
generators, and the global CPU/CUDA/numpy states are restored afterwards in any case.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from training import fast_mode, loss, pipeline, sampling


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 numpy, rounded as generate.py's PNGs. A
    diverged sample shows as grey rather than stopping the training."""
    images = torch.nan_to_num(images.to(torch.float64), nan=0, posinf=1, neginf=-1)
    return pipeline.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def tile(images, columns=None):
    """(N, H, W, C) uint8 -> one (rows*H, columns*W, C) image, row-major, black padding."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    padded = np.concatenate([images, np.zeros([rows * columns - n, h, w, c], dtype=np.uint8)])
    return padded.reshape(rows, columns, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, c)


class SampleGrid:
    def __init__(self, dataset, loss_kwargs, num_images=16, num_steps=32, seed=0, device=torch.device('cpu'), precision='fp32'):
        self.device = torch.device(device)
        # The training's precision: bf16 autocast around the U-Net; fp16 is the network's own use_fp16.
        self.fast = fast_mode.FastSettings(precision='bf16') if precision == 'bf16' else None
        self.seeds = list(range(seed, seed + num_images))
        self.num_steps, self.label_dim = num_steps, dataset.label_dim
        self.relay = loss.training_record(loss_kwargs).relay  # BlurLoss's settings; empty for the first stage.
        if self.relay:
            # Evenly spaced images of the dataset, read once: the same inputs at every snapshot.
            items = [dataset[int(idx)] for idx in np.linspace(0, len(dataset) - 1, num_images).round()]
            self.images = torch.as_tensor(np.stack([image for image, _label in items]))
            self.labels = torch.as_tensor(np.stack([label for _image, label in items])) if self.label_dim else None

    @torch.no_grad()
    def sample(self, net):
        """The grid of `net` (an eval-mode network on `device`) as one (H, W, C) uint8 image. The
        global torch (CPU and `device`'s CUDA) and numpy random states are restored afterwards."""
        net = fast_mode.prepare(net, self.fast)
        numpy_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == 'cuda' else []):
                rnd = sampling.StackedRandomGenerator(self.device, self.seeds)
                if self.relay:
                    start, out = self.relay_batch(net, list(range(len(self.seeds))), rnd)
                    return np.concatenate([tile(to_uint8(start)), tile(to_uint8(out))], axis=0)
                # First stage: the seeds' latents, class labels seed % label_dim as generate.py.
                latents = rnd.randn([len(self.seeds), net.img_channels, net.img_resolution, net.img_resolution], device=self.device)
                labels = pipeline.class_labels(self.label_dim, self.seeds, None, self.device)
                out = sampling.edm_sampler(net, latents, labels, randn_like=rnd.randn_like, num_steps=self.num_steps)
                return tile(to_uint8(out))
        finally:
            np.random.set_state(numpy_state)

    def relay_batch(self, net, indices, rnd=None, **options):
        """(start, output) of the relay from the grid's images `indices` with their seeds' generators
        (rnd: those generators): the training's settings and num_steps, or blur_sampler `options`."""
        # The training's relay settings as blur_sampler's arguments (up_scale, blur_sigma_max, s_block, truncation_t).
        relay = {pipeline.SAMPLER_OPTIONS[option].key: self.relay[key] for key, option in pipeline.RELAY_SETTINGS.items()}
        real = self.images[indices].to(self.device).to(torch.float32) / 127.5 - 1
        start = F.interpolate(F.avg_pool2d(real, relay['up_scale']), scale_factor=relay['up_scale'], mode='nearest')
        labels = self.labels[indices].to(self.device) if self.labels is not None else None
        rnd = rnd or sampling.StackedRandomGenerator(self.device, [self.seeds[i] for i in indices])
        options = dict(num_steps=self.num_steps, **relay) | options
        return start, sampling.blur_sampler(net, start, labels, randn_like=rnd.randn_like, **options)

    def write(self, net, path):
        """Sample and save the grid as a PNG at `path` atomically; returns the grid image."""
        grid = self.sample(net)
        pipeline.save_png(grid.transpose(2, 0, 1), path)
        return grid
