#!/usr/bin/env python3
"""PyTorch baseline for the GPU check: the same random DiT-XL/2 (seeded like gpu_models.py) sampled
with the reference MGD³ loop (50 DDPM steps, CFG pair per call, mode guidance to t_stop 25), once
image by image as the reference scripts do and once batched; prints images/s as JSON.

    python scripts/gpu_torch_baseline.py --batch 32 --images 64 [--fp16]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_onnx as E  # noqa: E402
import parity_reference as P  # noqa: E402


def schedule(steps=50):
    """The reference respaced schedule (one implementation, shared with the parity fixtures)."""
    sch = P.Schedule(1000, steps, 1e-4, 0.02)
    return dict(t=sch.timestep_map, sra=sch.sqrt_recip_abar, srm1=sch.sqrt_recipm1_abar, c1=sch.c1, c2=sch.c2,
                minlog=sch.min_log, maxlog=sch.max_log)


@torch.no_grad()
def sample(model, n, dtype, s, t_stop=25, lam=0.1, cfg=4.0):
    dev = "cuda"
    x = torch.randn(n, 4, 32, 32, device=dev)
    modes = torch.randn(n, 4, 32, 32, device=dev)
    y = torch.cat([torch.full((n,), 3, device=dev), torch.full((n,), 1000, device=dev)])
    for i in reversed(range(50)):
        t = torch.full((2 * n,), s["t"][i], device=dev)
        out = model(torch.cat([x, x]).to(dtype), t, y).float()
        c, u = out[:n], out[n:]
        eps = torch.cat([u[:, :3] + cfg * (c[:, :3] - u[:, :3]), c[:, 3:4]], 1)
        f = (c[:, 4:] + 1) / 2
        logvar = f * float(s["maxlog"][i]) + (1 - f) * float(s["minlog"][i])
        sigma = torch.exp(0.5 * logvar)
        x0 = float(s["sra"][i]) * x - float(s["srm1"][i]) * eps
        mu = float(s["c1"][i]) * x0 + float(s["c2"][i]) * x
        if i > t_stop:
            mu = mu - (x0 - modes) * lam * sigma
        x = mu + (sigma * torch.randn_like(x) if i > 0 else 0)
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
    s = schedule()
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
