#!/usr/bin/env python3
"""Real-size models with random weights for the GPU check (no weights can be downloaded there):
DiT-XL/2-256 (675 M parameters, original-DiT layout) and an SD-layout VAE (sd-vae-ft-mse config),
exported to the mgd3 contract with scripts/export_onnx.py, fp32, fp16 or (the DiT only) bf16.

    python scripts/gpu_models.py OUT_DIR [--fp16 | --bf16] [--graph plain|fused]
"""
import argparse
import os

import torch

import export_onnx as E


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="the DiT only, bfloat16 inside fp32 I/O")
    ap.add_argument("--graph", choices=E.GRAPHS, default="plain")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    dit = E.DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                num_classes=1000, learn_sigma=True)
    for p in dit.parameters():  # DiT zero-inits its adaLN/final layers: make the output non-trivial
        torch.nn.init.normal_(p, std=0.02)
    dit.eval()
    E.export_dit(dit, os.path.join(args.out, "dit.onnx"), in_channels=4, input_size=32, num_classes=1000,
                 learn_sigma=True, source="random DiT-XL/2-256 (gpu_check)", fp16=args.fp16, bf16=args.bf16,
                 graph=args.graph)
    if args.bf16:
        return
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=256)
    vae.eval()
    E.export_vae(vae, os.path.join(args.out, "vae_encoder.onnx"), os.path.join(args.out, "vae_decoder.onnx"),
                 image_size=256, scale_factor=0.18215, source="random sd-vae-ft-mse layout (gpu_check)",
                 fp16=args.fp16, graph=args.graph)


if __name__ == "__main__":
    main()
