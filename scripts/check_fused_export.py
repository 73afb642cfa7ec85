#!/usr/bin/env python3
"""Checks of the fused DiT/VAE graphs (export_onnx.py --graph fused / fuse) that run on a CPU in a
minute, for tests/tests/export.rs:

  1. census at DiT-XL/2's structure: depth 28, 16 heads, patch 2, 32x32x4 latents, 1000 classes,
     at a narrow width (hidden 128; the graph's nodes do not depend on the width): the fused
     export, fp32, fp16 and bf16, has 28 fused attentions, no Softmax, 28 FastGelu and 57
     LayerNormalization, and matches torch (export_onnx's own check: 1e-4, fp16 3e-2; bf16 is
     not run: ONNX Runtime's CPU provider has no bfloat16 kernels);
  2. fused vs plain within 1e-4 relative in fp32 on the tiny DiT and the shipped demo DiT and
     the tiny VAE halves (export_onnx.py fuse);
  3. the committed fused fixtures are what `fuse` writes today (same census and outputs);
  4. the CUDA VAE graph (export_onnx.py cuda-vae) of the tiny VAE halves: every GroupNorm with a
     SiLU or a skip fused (13 in the decoder, 9 in the encoder), every Conv an NhwcConv, the
     attention fused, no Softmax, and with those CUDA-only operators spelt out in standard ONNX
     ops, within 1e-4 of the plain graph on the CPU (the fp16 decoder, converted after the rewrite,
     within 3e-2).

    python scripts/check_fused_export.py [--root .]

Prints one `[census]` line per model and exits non-zero on the first failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_onnx as E  # noqa: E402


def xl_structure(tmp: str):
    torch.manual_seed(0)
    dit = E.DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=128, depth=28, num_heads=16,
                num_classes=1000, learn_sigma=True)
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for precision in ("fp32", "fp16", "bf16"):
        path = os.path.join(tmp, f"dit_xl2_structure_{precision}.onnx")
        E.export_dit(dit.eval(), path, in_channels=4, input_size=32, num_classes=1000, learn_sigma=True,
                     source="DiT-XL/2 structure (check_fused_export)", graph="fused", external_data=False,
                     fp16=precision == "fp16", bf16=precision == "bf16")
        xl_census(path, precision)


def xl_census(path: str, precision: str):
    census = E.graph_census(path)
    print(f"[census] DiT-XL/2 structure, fused, {precision}: {E.census_line(census)}")
    attention = sum(census.get(k, 0) for k in E.ATTENTION_OPS)
    want = {"fused attention": (attention, 28), "Softmax": (census.get(":Softmax", 0), 0),
            "FastGelu": (census.get("com.microsoft:FastGelu", 0), 28),
            "LayerNormalization": (census.get(":LayerNormalization", 0), 57)}
    for what, (got, expected) in want.items():
        if got != expected:
            raise SystemExit(f"DiT-XL/2 structure, {precision}: {got} {what}, expected {expected}")
    meta = E.onnx_metadata(path)
    if (meta.get("mgd3.graph"), meta.get("mgd3.fused_attention"), meta.get("mgd3.precision")) != ("fused", "28", precision):
        raise SystemExit(f"DiT-XL/2 structure: metadata {meta}")


def fused_vs_plain(root: str, tmp: str):
    models = [os.path.join(root, "tests/fixtures/models", n)
              for n in ("tiny_dit.onnx", "tiny_vae_encoder.onnx", "tiny_vae_decoder.onnx")]
    models.append(os.path.join(root, "models/demo/fashion_mnist_dit.onnx"))
    for plain in models:
        fused = os.path.join(tmp, os.path.basename(plain).replace(".onnx", "_fused.onnx"))
        census = E.fuse_onnx(plain, fused)
        print(f"[census] {os.path.basename(plain)}, fused: {E.census_line(census)}")
        E.compare_onnx(plain, fused, tol=1e-4)
        committed = os.path.join(root, "tests/fixtures/models", os.path.basename(fused))
        if os.path.exists(committed):
            if E.graph_census(committed) != census:
                raise SystemExit(f"{committed} is not what `export_onnx.py fuse` writes today: "
                                 "run scripts/make_test_models.py --only-fused")
            E.compare_onnx(fused, committed, tol=0.0)


def cuda_vae(root: str, tmp: str):
    for name, group_norms, fp16 in (("tiny_vae_decoder.onnx", 13, False), ("tiny_vae_encoder.onnx", 9, False),
                                    ("tiny_vae_decoder.onnx", 13, True)):
        plain = os.path.join(root, "tests/fixtures/models", name)
        precision = "fp16" if fp16 else "fp32"
        cuda = os.path.join(tmp, name.replace(".onnx", f"_cuda_{precision}.onnx"))
        census = E.cuda_vae_onnx(plain, cuda, fp16=fp16, check=lambda staged: E.check_cuda_vae(
            plain, staged, tol=3e-2 if fp16 else 1e-4))
        print(f"[census] {name}, CUDA graph, {precision}: {E.census_line(census)}")
        fused = census.get("com.microsoft:GroupNorm", 0) + census.get("com.microsoft:SkipGroupNorm", 0)
        want = {"fused GroupNorm": (fused, group_norms),
                "NhwcConv": (census.get("com.microsoft:NhwcConv", 0), E.graph_census(plain).get(":Conv", 0)),
                "Conv": (census.get(":Conv", 0), 0), "Softmax": (census.get(":Softmax", 0), 0),
                "fused attention": (sum(census.get(k, 0) for k in E.ATTENTION_OPS), 1)}
        for what, (got, expected) in want.items():
            if got != expected:
                raise SystemExit(f"{name}, CUDA graph: {got} {what}, expected {expected}")
        meta = E.onnx_metadata(cuda)
        if (meta.get("mgd3.cuda_only"), meta.get("mgd3.group_norm"), meta.get("mgd3.kind"),
                meta.get("mgd3.precision")) != ("1", str(group_norms), E.onnx_metadata(plain)["mgd3.kind"], precision):
            raise SystemExit(f"{name}, CUDA graph: metadata {meta}")


def repeated_nodes():
    """`_drop_repeated_nodes` drops exact repeats (ONNX Runtime's fp16 converter's shared Casts, as
    in the real SD VAE decoder) and refuses two different nodes under one output name."""
    from onnx import TensorProto, helper
    cast = lambda name: helper.make_node("Cast", ["s"], ["s_fp32"], name=name, to=TensorProto.FLOAT)  # noqa: E731
    graph = helper.make_graph([cast("a"), helper.make_node("Relu", ["s_fp32"], ["y"]), cast("b")], "g", [], [])
    E._drop_repeated_nodes(graph, "test")
    if [n.op_type for n in graph.node] != ["Cast", "Relu"]:
        raise SystemExit(f"repeated Cast not dropped: {[n.op_type for n in graph.node]}")
    graph.node.append(helper.make_node("Cast", ["other"], ["s_fp32"], to=TensorProto.FLOAT))
    try:
        E._drop_repeated_nodes(graph, "test")
    except RuntimeError:
        print("[repeated nodes] exact repeats dropped, a clash refused")
        return
    raise SystemExit("two different nodes under one output name were not refused")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        xl_structure(tmp)
        fused_vs_plain(a.root, tmp)
        cuda_vae(a.root, tmp)
        repeated_nodes()
    print("fused exports: all checks passed")


if __name__ == "__main__":
    main()
