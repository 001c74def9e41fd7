"""Quickstart: from nothing to relay samples on a CPU in a few minutes, with nothing to download.

    python quickstart.py --outdir=quickstart-out

Steps (each is skipped when its output already exists, so an interrupted run continues):

1. draw a procedural dataset of 64x64 images (coloured shapes whose fill has a 2-4 px stripe
   texture: structure at the 16 px scale and detail that only exists at 64 px),
2. convert it with dataset_tool.py into a 64x64 and a 16x16 dataset zip,
3. train a tiny first stage (EDM, 16x16) and a tiny second stage (blurring diffusion, 64x64,
   up_scale 4) with train.py,
4. sample with the relay pipeline (generate.py, both stages; `training.pipeline.RelayPipeline`),
5. draw relay.png: for a row of seeds, the first-stage image, its nearest upsampling, the
   second-stage start (upsampled + noise + block noise) and the final image; and samples-grid.png.

The trained snapshots work with every other script, e.g.
`python generate.py --network_first=<out>/first-stage/network-snapshot-*.pkl --network_second=...`.
"""

import glob
import os
import shutil
import subprocess
import sys

import click
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import dnnlib
from dnnlib.util import Number, seeds as seed_list_type
from training import pipeline

ROOT = os.path.dirname(os.path.abspath(__file__))

# More seeds than this is a typo for a quickstart (generate.py's own limit is 10,000,000); each
# relay seed is a row of relay.png.
MAX_SEEDS = 1_000_000
MAX_RELAY_SEEDS = 64
MAX_IMAGES = 1_000_000  # about 10 GB of PNGs
GAP = 2  # Pixels between the tiles of relay.png.

# Training presets for the two tiny stages, as train.py options. Small SongUNets (DDPM++), short
# warm-up and EMA so that a few thousand images of training already give recognisable shapes.
# One residual block per resolution keeps a CPU step fast (SongUNet's default is 4).
COMMON_TRAIN = dict(arch='ddpmpp', blocks=1, batch=32, lr='1e-3', **{'lr-rampup': 1}, ema='0.002',
                    dropout=0, augment=0, tick=2, snap=1000, dump=1000, seed=0, workers=0)
FIRST_STAGE = dict(precond='edm', cbase=32, cres='1,2', **COMMON_TRAIN)
SECOND_STAGE = dict(precond='blur', cbase=16, cres='1,1,2', **{'up-scale': 4, 'block-scale': 0.15, 'prob-length': 0.93,
                    'blur-sigma-max': 3}, **COMMON_TRAIN)


#----------------------------------------------------------------------------
# Procedural dataset.

def make_shapes_image(rng: np.random.Generator, resolution: int = 64) -> np.ndarray:
    """One HWC uint8 image: smooth two-colour background and 1-3 striped shapes."""
    r = resolution
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float64) / (r - 1)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = (1 - t)[..., None] * c0 + t[..., None] * c1
    for _ in range(rng.integers(1, 4)):
        mask_img = Image.new('L', (r, r), 0)
        draw = ImageDraw.Draw(mask_img)
        size = rng.uniform(0.2, 0.45) * r
        cx, cy = rng.uniform(size, r - size, size=2)
        kind = rng.integers(3)  # Ellipse, square or triangle.
        corners = [(cx - size, cy - size), (cx + size, cy + size)]
        triangle = [(cx, cy - size), (cx - size, cy + size), (cx + size, cy + size)]
        (draw.ellipse, draw.rectangle, draw.polygon)[kind](triangle if kind == 2 else corners, fill=255)
        mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255
        colour = rng.uniform(0, 255, size=3)
        # Stripes with a 2-4 px period (in 64 px units): averaged away at 16 px.
        period, phase, theta = rng.uniform(2, 4) * r / 64, rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) * (r - 1) / period + phase)
        img = img * (1 - mask) + (colour + 40 * stripes[..., None]) * mask
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_shapes_folder(folder: str, num_images: int, resolution: int = 64, seed: int = 0) -> None:
    """Write `num_images` PNGs into `folder`, which appears only when complete (atomic_write)."""
    rng = np.random.default_rng(seed)
    with dnnlib.util.atomic_write(folder, directory=True, overwrite=False) as tmp:
        for i in range(num_images):
            Image.fromarray(make_shapes_image(rng, resolution)).save(os.path.join(tmp, f'shape{i:05d}.png'))


#----------------------------------------------------------------------------
# Steps.

def run_step(args: list[str]) -> None:
    cmd = [sys.executable, *args]
    print('+ ' + ' '.join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, check=False)
    if result.returncode != 0:
        sys.exit(result.returncode)  # The step printed its own Error line.


def train_stage(outdir: str, name: str, data: str, options: dict, kimg: float) -> str:
    """Train one stage into outdir/name (unless done; the folder appears only when complete) and
    return its final network snapshot."""
    run_dir = os.path.join(outdir, name)
    snapshot = os.path.join(run_dir, 'network-final.pkl')
    if os.path.isfile(snapshot):
        print(f'{name}: {snapshot} exists, skipping training')
        return snapshot
    if os.path.lexists(run_dir):
        raise dnnlib.UserError(f'{run_dir} exists but holds no network-final.pkl; move it away or choose another --outdir')
    with dnnlib.util.atomic_write(run_dir, directory=True, overwrite=False) as tmp:
        run_step(['train.py', f'--outdir={tmp}', '--nosubdir', f'--data={data}', f'--duration={kimg / 1000}',
                  *[f'--{key}={value}' for key, value in options.items()]])
        snapshots = sorted(glob.glob(os.path.join(glob.escape(tmp), 'network-snapshot-*.pkl')))
        if not snapshots:
            raise dnnlib.UserError(f'{name}: training wrote no network snapshot')
        shutil.copyfile(snapshots[-1], os.path.join(tmp, 'network-final.pkl'))
    return snapshot


def relay_figure(net_first_path: str, net_second_path: str, seeds: list[int], path: str,
                 num_steps_first: int, num_steps_second: int) -> None:
    """For each seed, a row: first stage (at its own size) | nearest upsampled | second-stage
    start (upsampled + noise + block noise) | final."""
    pipe = pipeline.RelayPipeline(net_first_path, net_second_path, device='cpu', num_steps_first=num_steps_first,
                         num_steps_second=num_steps_second)
    trace = {}
    trace['final'] = pipe.sample(seeds, trace=trace)
    res, low = pipe.net_second.img_resolution, pipe.net_first.img_resolution
    # The first-stage image keeps its own pixels, centred on a grey tile of the final size.
    before, after = (res - low) // 2, res - low - (res - low) // 2
    first = F.pad(trace['first'], [before, after, before, after])
    tiles = torch.stack([first, trace['upsampled'], trace['start'], trace['final']], dim=1).to(torch.float64)
    tiles = F.pad(tiles.clamp(-1, 1), [GAP, 0, GAP, 0], value=1)  # [seed, column, C, H, W], white gaps above and left.
    canvas = F.pad(tiles.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2), [0, GAP, 0, GAP], value=1)
    image = pipeline.to_uint8(canvas[None])[0].repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x: 64 px tiles are visible.
    pipeline.save_png(image, path)


#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True))
@click.option('--outdir', help='Where to put the dataset, models, samples and pictures', metavar='DIR', default='quickstart-out')
@click.option('--images', 'num_images', help='Number of procedural training images', metavar='INT',
              type=click.IntRange(min=16, max=MAX_IMAGES), default=2000)
@click.option('--kimg-first', help='First-stage training length in thousands of images', metavar='KIMG',
              type=Number(0, low_open=True), default=20)
@click.option('--kimg-second', help='Second-stage training length in thousands of images', metavar='KIMG',
              type=Number(0, low_open=True), default=10)
@click.option('--seeds', help='Seeds to sample (e.g. 0-63)', metavar='LIST', default='0-63',
              callback=lambda ctx, param, text: (text, len(seed_list_type(MAX_SEEDS).convert(text, param, ctx))))  # generate.py gets the text.
@click.option('--relay-seeds', help='Seeds shown as rows in relay.png', metavar='LIST', type=seed_list_type(MAX_RELAY_SEEDS),
              default='0-5')
@click.option('--steps-first', help='First-stage sampling steps', metavar='INT', type=click.IntRange(min=2), default=18)
@click.option('--steps-second', help='Second-stage sampling steps (before truncation)', metavar='INT', type=click.IntRange(min=2),
              default=40)
def main(outdir, num_images, kimg_first, kimg_second, seeds, relay_seeds, steps_first, steps_second):
    """Prepare a procedural dataset, train both relay stages on it, sample, and draw the relay.

    Every step is skipped when its output already exists in --outdir, so re-running continues an
    interrupted quickstart and never retrains what is there.
    """
    seeds, seed_count = seeds  # As written, and how many (checked by the option).
    pipeline.check_outdir(outdir)
    os.makedirs(outdir, exist_ok=True)

    # 1. Procedural images.
    raw = os.path.join(outdir, 'shapes-raw')
    if os.path.lexists(raw) and not os.path.isdir(raw):
        raise dnnlib.UserError(f'{raw} exists and is not a folder of images; move it away or choose another --outdir')
    if not os.path.isdir(raw):
        print(f'Drawing {num_images} procedural images into {raw} ...')
        write_shapes_folder(raw, num_images)

    # 2. Datasets at both resolutions.
    data = {res: os.path.join(outdir, f'shapes-{res}x{res}.zip') for res in (64, 16)}
    for res, path in data.items():
        if not os.path.isfile(path):
            run_step(['dataset_tool.py', f'--source={raw}', f'--dest={path}', f'--resolution={res}x{res}'])

    # 3. Both stages.
    net_first = train_stage(outdir, 'first-stage', data[16], FIRST_STAGE, kimg_first)
    net_second = train_stage(outdir, 'second-stage', data[64], SECOND_STAGE, kimg_second)

    # 4. Relay samples.
    samples = os.path.join(outdir, 'samples')
    run_step(['generate.py', '--sampler_stages=both', f'--network_first={net_first}', f'--network_second={net_second}',
              f'--outdir={samples}', f'--seeds={seeds}', f'--num_steps_first={steps_first}',
              f'--num_steps_second={steps_second}', f'--grid={min(seed_count, 64)}'])

    # 5. The relay picture.
    relay_png = os.path.join(outdir, 'relay.png')
    relay_figure(net_first, net_second, relay_seeds, relay_png, steps_first, steps_second)

    print(f'\nDone. Everything is in {os.path.abspath(outdir)}')
    for what, where in [('datasets', f'{data[16]}, {data[64]}'), ('first stage', net_first), ('second stage', net_second),
                        ('samples', f'{samples}/ ({seed_count} PNGs)'), ('sample grid', f'{os.path.normpath(samples)}-grid.png'),
                        ('relay picture', f'{relay_png} (columns: first stage, upsampled, second-stage start, final)')]:
        print(f'  {what + ":":18s}{where}')
    print('Sample again with your own options:')
    print(f'  python generate.py --network_first={net_first} --network_second={net_second} --outdir=... --seeds=...')


if __name__ == '__main__':
    main()
