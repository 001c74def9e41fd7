"""Throughput of dataset_tool.py: images/s for an ImageNet-like 256x256 conversion
(JPEG photos of about 500x375 -> center-crop-dhariwal 256x256 -> uncompressed PNG in a zip),
for each --workers value, on generated images. Also checks that all runs wrote the same bytes.

    python benchmarks/bench_dataset_tool.py                       # 200 images, workers 1 and 2
    python benchmarks/bench_dataset_tool.py --num-images=1000 --workers=1,2,4,8
"""

import hashlib
import os
import resource
import sys
import tempfile
import time

import click
import numpy as np
import PIL.Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset_tool  # noqa: E402

def make_photos(folder, num, seed=0):
    """JPEGs with ImageNet-like sizes and content that compresses like a photo (smooth + detail)."""
    rng = np.random.default_rng(seed)
    for i in range(num):
        w, h = (500, 375) if i % 3 else (int(rng.integers(300, 800)), int(rng.integers(250, 600)))
        low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = PIL.Image.fromarray(low).resize((w, h), PIL.Image.Resampling.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        sub = os.path.join(folder, f'n{i % 10:08d}')
        os.makedirs(sub, exist_ok=True)
        PIL.Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(sub, f'{i:06d}.JPEG'), quality=90)

def cpu_seconds():
    # This process and its finished children (pool workers are joined by terminate()).
    r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(x.ru_utime + x.ru_stime for x in r)

@click.command()
@click.option('--num-images', help='Generated source images', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--workers', help='Comma-separated --workers values', default='1,2', show_default=True)
@click.option('--resolution', help='Output size N (NxN)', type=int, default=256, show_default=True)
def main(num_images, workers, resolution):
    workers = [int(x) for x in workers.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'src')
        t0 = time.perf_counter()
        make_photos(src, num_images)
        print(f'generated {num_images} JPEGs in {time.perf_counter() - t0:.1f} s; CPUs: {os.cpu_count()}')
        digests = set()
        for run, n in enumerate(workers):
            dest = os.path.join(tmp, f'out-{run}.zip')
            t0, c0 = time.perf_counter(), cpu_seconds()
            dataset_tool.convert(src, dest, transform='center-crop-dhariwal', resolution=(resolution, resolution),
                                 workers=n, log=lambda msg: None)
            dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            with open(dest, 'rb') as f:
                digests.add(hashlib.sha256(f.read()).hexdigest())
            print(f'workers={n}: {num_images / dt:7.1f} images/s  ({dt:.2f} s for {num_images} images, '
                  f'{os.path.getsize(dest) / 2**20:.1f} MiB zip, start-up included; '
                  f'{1000 * cpu / num_images:.1f} CPU-ms/image)')
        print('identical output for all worker counts:', len(digests) == 1)

if __name__ == '__main__':
    main()
