#!/usr/bin/env python3
"""PyTorch baseline for the GPU check: the same random DiT-XL/2 (seeded like gpu_models.py) sampled
with the reference MGD³ loop (50 DDPM steps, CFG pair per call, mode guidance to t_stop 25), once
image by image as the reference scripts do and once batched, with the attention as DiT's models.py
writes it (matmul, softmax, matmul) or, with --sdpa, through torch's fused
scaled_dot_product_attention (flash / memory-efficient kernels); prints images/s as one JSON line.

    python scripts/gpu_torch_baseline.py --batch 32 --images 64 [--fp16] [--sdpa]
    python scripts/gpu_torch_baseline.py --device cpu --steps 2 --batch 2 --images 2 --batch1-images 1
        (the CPU dry run of scripts/gpu_check.sh)
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F

import export_onnx as E
import mgd3ref as R


def sdpa_forward(self, x):
    """export_onnx.Attention.forward through F.scaled_dot_product_attention (same maths)."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def sample(model, n, dtype, sch, device, t_stop, lam=0.1, cfg=4.0):
    """The reference DDPM loop (mgd3ref.ddpm_sample_torch): N images of class 3, CFG on 3 of 4
    channels, random modes."""
    x = torch.randn(n, 4, 32, 32, device=device)
    modes = torch.randn(n, 4, 32, 32, device=device)
    x = R.ddpm_sample_torch(model, sch, x, modes, 3, 1000, t_stop, lam, cfg, torch.randn_like, cfg_channels=3,
                            dtype=dtype)
    synchronize(device)
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="images per batched sampling loop")
    ap.add_argument("--images", type=int, default=64, help="images timed in the batched loop")
    ap.add_argument("--batch1-images", type=int, default=4, help="images timed one by one")
    ap.add_argument("--steps", type=int, default=50, help="DDPM steps (respaced from 1000)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fp16", action="store_true", help="run the DiT in float16 (the step maths stays float32)")
    ap.add_argument("--sdpa", action="store_true", help="attention through F.scaled_dot_product_attention")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.sdpa:
        E.Attention.forward = sdpa_forward
    torch.manual_seed(0)
    dtype = torch.float16 if args.fp16 else torch.float32
    model = E.DiT(input_size=32, num_classes=1000).to(args.device).to(dtype).eval()
    s = R.DdpmSchedule(1000, args.steps, 1e-4, 0.02)
    t_stop = args.steps // 2
    sample(model, 1, dtype, s, args.device, t_stop)  # warm-up
    started = time.perf_counter()
    for _ in range(args.batch1_images):
        sample(model, 1, dtype, s, args.device, t_stop)
    batch1 = args.batch1_images / (time.perf_counter() - started)
    sample(model, args.batch, dtype, s, args.device, t_stop)  # warm-up at this batch
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    done = 0
    while done < args.images:
        sample(model, args.batch, dtype, s, args.device, t_stop)
        done += args.batch
    batched = done / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    print(json.dumps({"torch_batch1_images_per_s": round(batch1, 4), "torch_batched_images_per_s": round(batched, 4),
                      "batch": args.batch, "dtype": str(dtype), "attention": "sdpa" if args.sdpa else "matmul",
                      "steps": args.steps, "device": args.device, "peak_memory_mib": peak}))


if __name__ == "__main__":
    main()
