#!/usr/bin/env python3
"""Writes tests/fixtures/pillow: lossless (PNG) inputs cut from scikit-image's sample photographs
and what Pillow makes of them with the reference preprocessing (ADM `center_crop_arr`: BOX
halvings while the short side is at least twice the target, BICUBIC resize of the short side to
the target, centred crop), so that the worker's resampler is checked against Pillow itself on
identical decoded pixels (JPEG decoders differ by a grey level or two; PNG does not).

    .venv-bench/bin/python scripts/make_pillow_goldens.py [--out tests/fixtures/pillow]

Needs numpy, pillow and scikit-image (scripts/requirements-bench.txt). The crop is
mgd3ref.center_crop_arr, the one the pipeline benchmark's reference (scripts/bench_reference.py)
runs. Writes <name>.png (input), <name>.crop<S>.png (Pillow's output) and cases.json.
"""

from __future__ import annotations

import argparse
import json
import os

from PIL import Image
from skimage import data as photos

from mgd3ref import center_crop_arr


# (name, photo, crop box in the photo (left, top, right, bottom), input size, mode, target size)
CASES = [
    ("coffee_down", "coffee", (0, 0, 600, 400), (250, 167), "RGB", 64),      # plain bicubic down
    ("astronaut_halve", "astronaut", (0, 0, 512, 512), (300, 277), "RGB", 64),  # one BOX halving first
    ("chelsea_halve2", "chelsea", (0, 0, 451, 300), (301, 201), "RGB", 48),    # two halvings, odd sizes
    ("rocket_up", "rocket", (100, 50, 300, 400), (45, 79), "RGB", 64),          # upscaling, portrait
    ("camera_gray", "camera", (0, 0, 512, 512), (173, 131), "L", 56),           # grayscale
    ("coffee_exact", "coffee", (50, 50, 450, 450), (96, 96), "RGB", 96),        # already the target size
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "pillow"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for name, photo, box, size, mode, target in CASES:
        pixels = getattr(photos, photo)()
        image = Image.fromarray(pixels).convert(mode).crop(box)
        # LANCZOS makes the input; only the preprocessing under test uses BOX/BICUBIC.
        image = image.resize(size, resample=Image.LANCZOS)
        image.save(os.path.join(args.out, f"{name}.png"), optimize=True)
        crop = center_crop_arr(image, target)
        crop.save(os.path.join(args.out, f"{name}.crop{target}.png"), optimize=True)
        manifest.append({"name": name, "mode": mode, "size": list(size), "target": target})
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump({"pillow": Image.__version__, "cases": manifest}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
