#!/usr/bin/env python3
"""Writes an ImageNet-shaped ImageFolder of real photographs for the pipeline benchmark.

    python scripts/bench_make_dataset.py --out DIR [--classes 5] [--per-class 1300] [--seed 0]
        [--processes P] [--if-needed]

Layout (as ImageNet's train split):

    DIR/n00000000/n00000000_1.JPEG, n00000000_2.JPEG, ...   (one folder per made-up wnid)
    DIR/classes.txt    one wnid per line
    DIR/dataset.json   the parameters and a summary (--if-needed compares it to decide whether to
                       rebuild); written last, so a folder without it is incomplete

The pictures are natural photographs, never synthetic patterns: the sample photos bundled inside
the scikit-image wheel that load without a download (see PHOTOS; gray ones are made RGB). Each
image is one deterministic random view of one photo, shaped like an ImageNet training image:

- a random crop window (35-100 % of the largest window of the chosen aspect ratio that fits);
- aspect ratio 4:3 landscape (45 %), 3:4 portrait (20 %), square (10 %) or anything in between
  (25 %); short side 333-500 px, long side at most 640 px (Lanczos resampling, which upscales
  the smaller photos a little, as many ImageNet images were);
- a random horizontal flip, mild brightness / contrast / saturation / per-channel gain jitter;
- baseline JPEG (4:2:0, no optimisation, no EXIF, like most ImageNet files), quality drawn from
  75-95 and then moved by 5 until the file is 30-70 KB (ImageNet averages ~110 KB at ~400x350;
  we aim at ~50 KB), which a few photos cannot always reach at the quality limits.

Each class mixes the photos with its own Dirichlet weights, so classes differ in content. Every
random draw comes from a numpy Generator seeded by (seed, class, image), so the output is the
same byte for byte for the same seed and package versions (Pillow's libjpeg-turbo), whatever the
number of worker processes. The work is spread over os.cpu_count() processes.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageEnhance

# Bump when the generator's output changes for the same parameters (the driver then rebuilds).
GENERATOR_VERSION = 1

# scikit-image sample photographs that ship inside the wheel (no pooch download needed).
# name -> how to get an HxW or HxWx3 uint8 array out of skimage.data.
PHOTOS = {
    "astronaut": lambda d: d.astronaut(),  # 512x512 colour portrait
    "chelsea": lambda d: d.chelsea(),  # 300x451 colour, a cat
    "coffee": lambda d: d.coffee(),  # 400x600 colour, a cup of coffee
    "rocket": lambda d: d.rocket(),  # 427x640 colour, a rocket on the launch pad
    "motorcycle_left": lambda d: d.stereo_motorcycle()[0],  # 500x741 colour
    "motorcycle_right": lambda d: d.stereo_motorcycle()[1],  # the stereo pair's other view
    "hubble_deep_field": lambda d: d.hubble_deep_field(),  # 872x1000 colour, telescope photo
    "immunohistochemistry": lambda d: d.immunohistochemistry(),  # 512x512 colour, microscope
    "retina": lambda d: d.retina(),  # 1411x1411 colour, fundus photograph
    "camera": lambda d: d.camera(),  # 512x512 gray, the cameraman
    "moon": lambda d: d.moon(),  # 512x512 gray, lunar surface
    "brick": lambda d: d.brick(),  # 512x512 gray, brick wall
    "grass": lambda d: d.grass(),  # 512x512 gray, grass
    "gravel": lambda d: d.gravel(),  # 512x512 gray, gravel
    "coins": lambda d: d.coins(),  # 303x384 gray, coins
    "clock": lambda d: d.clock(),  # 300x400 gray, a clock (motion-blurred)
}

GRAY = {"camera", "moon", "brick", "grass", "gravel", "coins", "clock"}

MIN_BYTES, MAX_BYTES = 30_000, 70_000
Q_MIN, Q_MAX, Q_STEP = 75, 95, 5
SHORT_MIN, SHORT_MAX, LONG_MAX = 333, 500, 640

_photos: list[Image.Image] = []  # loaded once per worker process


def load_photos() -> list[Image.Image]:
    """The PHOTOS as RGB PIL images, in PHOTOS order."""
    import skimage.data as data

    out = []
    for name, get in PHOTOS.items():
        arr = np.asarray(get(data))
        if arr.dtype != np.uint8:
            raise SystemExit(f"skimage.data photo {name} is {arr.dtype}, expected uint8")
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append(Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB"))
    return out


def _init_worker():
    global _photos
    _photos = load_photos()


def wnid(k: int) -> str:
    """Made-up ImageNet-style synset id of class k: n00000000, n00000001, ..."""
    return f"n{k:08d}"


def class_weights(seed: int, k: int) -> np.ndarray:
    """The mix of photos in class k: Dirichlet, so each class leans on a few photos; the gray
    photos get a smaller prior (~10 % of the images, ImageNet has a few % grayscale)."""
    rng = np.random.default_rng([seed, k, 0xC1A55])
    alpha = np.array([0.1 if name in GRAY else 0.6 for name in PHOTOS])
    return rng.dirichlet(alpha)


def draw_aspect(rng: np.random.Generator) -> float:
    """Width / height of the output, ImageNet-like (mostly 4:3 landscape)."""
    u = rng.random()
    if u < 0.45:
        return 4 / 3
    if u < 0.65:
        return 3 / 4
    if u < 0.75:
        return 1.0
    return float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))


def render(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random ImageNet-shaped view of `photo` (crop, resize, flip, colour jitter)."""
    aspect = draw_aspect(rng)
    sw, sh = photo.size
    # largest window of this aspect that fits, then a random fraction of its area
    if sw / sh > aspect:
        wmax, hmax = sh * aspect, float(sh)
    else:
        wmax, hmax = float(sw), sw / aspect
    s = float(np.sqrt(rng.uniform(0.35, 1.0)))
    cw, ch = wmax * s, hmax * s
    x0 = rng.uniform(0.0, sw - cw)
    y0 = rng.uniform(0.0, sh - ch)
    # output size: short side 333-500, long side at most 640
    short = int(rng.integers(SHORT_MIN, SHORT_MAX + 1))
    if aspect >= 1:
        w, h = round(short * aspect), short
    else:
        w, h = short, round(short / aspect)
    if max(w, h) > LONG_MAX:
        f = LONG_MAX / max(w, h)
        w, h = round(w * f), round(h * f)
    img = photo.resize((w, h), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # colour jitter: per-channel gain x brightness through one lookup table, then contrast and
    # saturation blends (all 8-bit integer operations in Pillow: deterministic)
    brightness = rng.uniform(0.85, 1.15)
    gains = rng.uniform(0.95, 1.05, size=3) * brightness
    ramp = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.clip(np.rint(ramp * g), 0, 255) for g in gains]).astype(np.uint8)
    img = img.point(lut.tolist())
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.9, 1.1))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    return img


def encode(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, int]:
    """Baseline JPEG at a random quality, nudged by Q_STEP towards MIN_BYTES..MAX_BYTES."""
    q = int(rng.integers(Q_MIN, Q_MAX + 1))
    direction = 0
    while True:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q, subsampling="4:2:0", optimize=False, progressive=False)
        data = buf.getvalue()
        if len(data) > MAX_BYTES and q > Q_MIN and direction <= 0:
            q, direction = max(Q_MIN, q - Q_STEP), -1
        elif len(data) < MIN_BYTES and q < Q_MAX and direction >= 0:
            q, direction = min(Q_MAX, q + Q_STEP), 1
        else:
            return data, q


def make_image(task):
    """Renders and writes image i of class k; returns (k, photo index, w, h, bytes, quality)."""
    root, seed, k, i, weights = task
    rng = np.random.default_rng([seed, k, i])
    p = int(rng.choice(len(_photos), p=weights))
    img = render(_photos[p], rng)
    data, q = encode(img, rng)
    name = wnid(k)
    with open(os.path.join(root, name, f"{name}_{i + 1}.JPEG"), "wb") as f:
        f.write(data)
    return k, p, img.size[0], img.size[1], len(data), q


def is_current(out: str, a: argparse.Namespace) -> bool:
    """Whether `out` holds a complete dataset made by this generator with these parameters."""
    try:
        with open(os.path.join(out, "dataset.json")) as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    want = {"generator_version": GENERATOR_VERSION, "classes": a.classes, "per_class": a.per_class,
            "seed": a.seed, "photos": list(PHOTOS)}
    return all(have.get(k) == v for k, v in want.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="dataset root to create (replaced if it exists)")
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=1300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--if-needed", action="store_true",
                    help="do nothing when DIR/dataset.json already records these parameters")
    a = ap.parse_args(argv)
    if a.classes < 1 or a.per_class < 1:
        ap.error("--classes and --per-class must be positive")
    if a.if_needed and is_current(a.out, a):
        print(f"dataset {a.out} is up to date ({a.classes} classes x {a.per_class}, seed {a.seed})")
        return

    started = time.perf_counter()
    out = os.path.abspath(a.out)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for k in range(a.classes):
        os.makedirs(os.path.join(tmp, wnid(k)))
    tasks = [(tmp, a.seed, k, i, class_weights(a.seed, k)) for k in range(a.classes) for i in range(a.per_class)]
    with mp.Pool(a.processes, initializer=_init_worker) as pool:
        rows = pool.map(make_image, tasks, chunksize=32)
    rows = np.array(rows, dtype=np.int64)

    with open(os.path.join(tmp, "classes.txt"), "w") as f:
        f.writelines(wnid(k) + "\n" for k in range(a.classes))
    sizes, widths, heights, quality = rows[:, 4], rows[:, 2], rows[:, 3], rows[:, 5]
    summary = {
        "generator_version": GENERATOR_VERSION,
        "classes": a.classes,
        "per_class": a.per_class,
        "seed": a.seed,
        "photos": list(PHOTOS),
        "images": int(len(rows)),
        "bytes_total": int(sizes.sum()),
        "bytes_mean": round(float(sizes.mean()), 1),
        "bytes_min": int(sizes.min()),
        "bytes_max": int(sizes.max()),
        "bytes_in_target_fraction": round(float(((sizes >= MIN_BYTES) & (sizes <= MAX_BYTES)).mean()), 4),
        "width_mean": round(float(widths.mean()), 1),
        "height_mean": round(float(heights.mean()), 1),
        "quality_mean": round(float(quality.mean()), 2),
        "photo_counts": {name: int((rows[:, 1] == j).sum()) for j, name in enumerate(PHOTOS)},
    }
    # dataset.json last: its presence marks a complete dataset
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    took = time.perf_counter() - started
    print(f"wrote {summary['images']} images ({a.classes} classes x {a.per_class}) into {out} in {took:.1f} s: "
          f"mean {summary['bytes_mean'] / 1000:.1f} KB (min {summary['bytes_min'] / 1000:.1f}, max "
          f"{summary['bytes_max'] / 1000:.1f}, {100 * summary['bytes_in_target_fraction']:.1f} % in "
          f"{MIN_BYTES // 1000}-{MAX_BYTES // 1000} KB), mean size {summary['width_mean']:.0f}x"
          f"{summary['height_mean']:.0f}, mean quality {summary['quality_mean']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
