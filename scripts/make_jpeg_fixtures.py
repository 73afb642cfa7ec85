#!/usr/bin/env python3
"""Writes tests/fixtures/jpeg: small JPEGs the image check is tested on, each judged by Pillow
(the loader the reference code uses) as it writes them:

  good.jpg          a gradient, baseline 4:2:0
  progressive.jpg   the same, progressive
  grey.jpg, cmyk.jpg  the same in one channel and in CMYK (Pillow reads both)
  extraneous.jpg    240 stray bytes before the end marker (libjpeg warns, Pillow reads it;
                    some ImageNet files are like this)
  corrupt_read.jpg  40 bytes of the scan overwritten, seed 0: Pillow reads it (garbled)
  corrupt_scan.jpg  40 bytes of the scan overwritten, seed 1: Pillow refuses it ("broken data
                    stream when reading image file")

    .venv-eval/bin/python scripts/make_jpeg_fixtures.py
"""
import io
import pathlib
import random

import numpy as np
from PIL import Image

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "jpeg"
out.mkdir(parents=True, exist_ok=True)
ramp = np.linspace(0, 255, 200).astype("uint8")
image = Image.fromarray(np.stack([np.tile(ramp, (200, 1)), np.tile(ramp, (200, 1)).T,
                                  np.full((200, 200), 128, "uint8")], -1))


def encoded(img, **options):
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90, **options)
    return bytearray(buffer.getvalue())


good = encoded(image)
files = {"good.jpg": good, "progressive.jpg": encoded(image, progressive=True),
         "grey.jpg": encoded(image.convert("L")), "cmyk.jpg": encoded(image.convert("CMYK"))}
end = good.rfind(b"\xff\xd9")
files["extraneous.jpg"] = good[:end] + bytes(range(1, 241)) + good[end:]
scan = good.find(b"\xff\xda")
for name, seed in [("corrupt_read.jpg", 0), ("corrupt_scan.jpg", 1)]:
    corrupt, rng = bytearray(good), random.Random(seed)
    for _ in range(40):
        corrupt[rng.randrange(scan + 20, len(corrupt) - 2)] = rng.randrange(256)
    files[name] = corrupt
for name, data in files.items():
    try:
        Image.open(io.BytesIO(bytes(data))).load()
        verdict = "Pillow reads it"
    except OSError as error:
        verdict = f"Pillow refuses it: {error}"
    (out / name).write_bytes(bytes(data))
    print(f"{name}: {len(data)} bytes, {verdict}")
