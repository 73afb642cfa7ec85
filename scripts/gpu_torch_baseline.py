#!/usr/bin/env python3
"""PyTorch baseline for the GPU check: the same random DiT-XL/2 (seeded like gpu_models.py) sampled
with the reference MGD³ loop (50 DDPM steps, CFG pair per call, mode guidance to t_stop 25), once
image by image as the reference scripts do and once batched; prints images/s as JSON.

    python scripts/gpu_torch_baseline.py --batch 32 --images 64 [--fp16]
"""
import argparse
import json
import time

import torch

import export_onnx as E
import mgd3ref as R


@torch.no_grad()
def sample(model, n, dtype, sch, t_stop=25, lam=0.1, cfg=4.0):
    """The reference DDPM loop (mgd3ref.ddpm_sample_torch) on CUDA: N images of class 3, CFG on 3 of 4
    channels, random modes."""
    dev = "cuda"
    x = torch.randn(n, 4, 32, 32, device=dev)
    modes = torch.randn(n, 4, 32, 32, device=dev)
    x = R.ddpm_sample_torch(model, sch, x, modes, 3, 1000, t_stop, lam, cfg, torch.randn_like, cfg_channels=3,
                            dtype=dtype)
    torch.cuda.synchronize()
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    dtype = torch.float16 if args.fp16 else torch.float32
    model = E.DiT(input_size=32, num_classes=1000).cuda().to(dtype).eval()
    s = R.DdpmSchedule(1000, 50, 1e-4, 0.02)
    sample(model, 1, dtype, s)  # warm-up
    started = time.time()
    for _ in range(4):
        sample(model, 1, dtype, s)
    batch1 = 4 / (time.time() - started)
    sample(model, args.batch, dtype, s)
    started = time.time()
    done = 0
    while done < args.images:
        sample(model, args.batch, dtype, s)
        done += args.batch
    batched = done / (time.time() - started)
    print(json.dumps({"torch_batch1_images_per_s": batch1, "torch_batched_images_per_s": batched,
                      "batch": args.batch, "dtype": str(dtype)}))


if __name__ == "__main__":
    main()
