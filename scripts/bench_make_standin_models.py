#!/usr/bin/env python3
"""Stand-in ONNX models with the real shapes of DiT-XL/2 (256 px) and sd-vae-ft-mse, for the
pipeline benchmark: the networks cost almost nothing, so what is measured is everything around
them (listing, JPEG decoding, preprocessing, batching, k-means, the sampler's bookkeeping).

    python scripts/bench_make_standin_models.py --out DIR

writes DIR/vae_encoder.onnx, DIR/vae_decoder.onnx and DIR/dit.onnx (a few KB each), built with
the `onnx` helper API (no torch), opset 18, IR version 9, float32, batch dimension `batch`
symbolic and every other dimension fixed, and the `mgd3.*` metadata that scripts/export_onnx.py
writes for the real exports (the model contract of onnx/src/contract.rs, dit.rs, vae.rs):

  vae_encoder.onnx  image float [batch,3,256,256] in [-1,1]
                    -> mean float [batch,4,32,32], logvar float [batch,4,32,32]
      mean = Conv1x1(AveragePool8x8(image)) with a fixed 3->4 mix (about the scale of real SD
      latents, |mean| of a few units); logvar = 0.
      metadata: mgd3.kind=vae_encoder, mgd3.scale_factor=0.18215, mgd3.image_size=256,
                mgd3.source=mgd3-bench:standin-sd-vae-ft-mse, mgd3.precision=fp32
  vae_decoder.onnx  latent float [batch,4,32,32] (unscaled) -> image float [batch,3,256,256]
      image = tanh(NearestUpsample8x(Conv1x1(latent))) with a fixed 4->3 mix.
      metadata: mgd3.kind=vae_decoder, otherwise as the encoder
  dit.onnx          x float [batch,4,32,32], t int64 [batch], y int64 [batch]
                    -> out float [batch,8,32,32] (learn_sigma: eps channels, then v channels)
      eps = sqrt(1-abar[t]) * (x - sqrt(abar[t]) * mu[y]), the exact noise predictor for
      latents x0 ~ N(mu[y], I) under the linear schedule, so a sampler run with it stays at
      latents of order 1 (mu: a fixed per-class, per-channel mean of size ~0.5, mu[null] = 0;
      classifier-free guidance scales it); v = tanh(0.1 * x), inside [-1, 1].
      metadata: mgd3.kind=dit, mgd3.num_classes=1000 (null class 1000), mgd3.learn_sigma=true,
                mgd3.train_timesteps=1000, mgd3.beta_schedule=linear, mgd3.beta_start=0.0001,
                mgd3.beta_end=0.02, mgd3.source=mgd3-bench:standin-dit-xl-2-256,
                mgd3.precision=fp32

The script checks every model with onnx.checker and runs it in onnxruntime (CPU) at batch 1 and
64, checking the output shapes and that the outputs are finite.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 9
IMAGE_SIZE = 256  # pixels
DOWN = 8  # VAE downsampling factor
LATENT = (4, IMAGE_SIZE // DOWN, IMAGE_SIZE // DOWN)  # [C, h, w]
NUM_CLASSES = 1000
SCALE_FACTOR = 0.18215
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = "0.0001", "0.02"  # written as strings, as scripts/export_onnx.py does
SEED = 20260101


def vae_metadata(kind: str) -> dict[str, str]:
    # the same keys and formatting as export_onnx.vae_metadata
    return {
        "mgd3.kind": kind,
        "mgd3.scale_factor": repr(float(SCALE_FACTOR)),
        "mgd3.image_size": str(IMAGE_SIZE),
        "mgd3.source": "mgd3-bench:standin-sd-vae-ft-mse",
        "mgd3.precision": "fp32",
    }


def dit_metadata() -> dict[str, str]:
    # the same keys and formatting as export_onnx.dit_metadata
    return {
        "mgd3.kind": "dit",
        "mgd3.num_classes": str(NUM_CLASSES),
        "mgd3.learn_sigma": "true",
        "mgd3.train_timesteps": str(TRAIN_TIMESTEPS),
        "mgd3.beta_schedule": "linear",
        "mgd3.beta_start": BETA_START,
        "mgd3.beta_end": BETA_END,
        "mgd3.source": "mgd3-bench:standin-dit-xl-2-256",
        "mgd3.precision": "fp32",
    }


def f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape])


def i64(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch"])


def const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


def finish(graph: onnx.GraphProto, metadata: dict[str, str], path: str):
    """Wraps the graph in a model with the metadata, checks it and saves it."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="mgd3 make_standin_models.py")
    model.ir_version = IR_VERSION
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def vae_encoder(rng: np.random.Generator, path: str):
    c, h, w = LATENT
    # 3 -> 4 mix: an SD-like latent has |values| up to ~5 (unscaled), so scale the [-1, 1] means
    weight = (rng.standard_normal((c, 3, 1, 1)) * 2.0).astype(np.float32)
    bias = (rng.standard_normal(c) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[DOWN, DOWN], strides=[DOWN, DOWN]),
        helper.make_node("Conv", ["pooled", "enc_w", "enc_b"], ["mean"], kernel_shape=[1, 1]),
        helper.make_node("Shape", ["mean"], ["mean_shape"]),
        helper.make_node("ConstantOfShape", ["mean_shape"], ["logvar"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
    ]
    graph = helper.make_graph(nodes, "standin_vae_encoder", [f32("image", (3, IMAGE_SIZE, IMAGE_SIZE))],
                              [f32("mean", LATENT), f32("logvar", LATENT)],
                              initializer=[const("enc_w", weight), const("enc_b", bias)])
    finish(graph, vae_metadata("vae_encoder"), path)


def vae_decoder(rng: np.random.Generator, path: str):
    c, h, w = LATENT
    weight = (rng.standard_normal((3, c, 1, 1)) * 0.1).astype(np.float32)
    bias = np.zeros(3, np.float32)
    scales = np.array([1.0, 1.0, DOWN, DOWN], np.float32)
    nodes = [
        helper.make_node("Conv", ["latent", "dec_w", "dec_b"], ["mixed"], kernel_shape=[1, 1]),
        # Resize inputs: X, roi (empty), scales
        helper.make_node("Resize", ["mixed", "", "dec_scales"], ["upsampled"], mode="nearest"),
        helper.make_node("Tanh", ["upsampled"], ["image"]),
    ]
    graph = helper.make_graph(nodes, "standin_vae_decoder", [f32("latent", LATENT)],
                              [f32("image", (3, IMAGE_SIZE, IMAGE_SIZE))],
                              initializer=[const("dec_w", weight), const("dec_b", bias),
                                           const("dec_scales", scales)])
    finish(graph, vae_metadata("vae_decoder"), path)


def dit(rng: np.random.Generator, path: str):
    c, h, w = LATENT
    betas = np.linspace(float(BETA_START), float(BETA_END), TRAIN_TIMESTEPS, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    # per-timestep coefficients, shaped [T, 1, 1, 1] so that Gather(t) broadcasts over [B, C, h, w]
    c_x = np.sqrt(1.0 - abar).astype(np.float32).reshape(-1, 1, 1, 1)
    c_mu = (np.sqrt(1.0 - abar) * np.sqrt(abar)).astype(np.float32).reshape(-1, 1, 1, 1)
    # per-class channel means [K+1, C, 1, 1]; the null class (row K) has mean 0
    mu = (rng.standard_normal((NUM_CLASSES + 1, c, 1, 1)) * 0.5).astype(np.float32)
    mu[NUM_CLASSES] = 0.0
    nodes = [
        helper.make_node("Gather", ["c_x", "t"], ["cx_t"], axis=0),  # [B,1,1,1]
        helper.make_node("Gather", ["c_mu", "t"], ["cmu_t"], axis=0),  # [B,1,1,1]
        helper.make_node("Gather", ["mu", "y"], ["mu_y"], axis=0),  # [B,C,1,1]
        helper.make_node("Mul", ["cx_t", "x"], ["eps_x"]),
        helper.make_node("Mul", ["cmu_t", "mu_y"], ["eps_mu"]),
        helper.make_node("Sub", ["eps_x", "eps_mu"], ["eps"]),  # [B,C,h,w]
        helper.make_node("Mul", ["x", "v_gain"], ["v_in"]),
        helper.make_node("Tanh", ["v_in"], ["v"]),  # [B,C,h,w] in [-1, 1]
        helper.make_node("Concat", ["eps", "v"], ["out"], axis=1),
    ]
    graph = helper.make_graph(nodes, "standin_dit_xl_2_256", [f32("x", LATENT), i64("t"), i64("y")],
                              [f32("out", (2 * c, h, w))],
                              initializer=[const("c_x", c_x), const("c_mu", c_mu), const("mu", mu),
                                           const("v_gain", np.array(0.1, np.float32))])
    finish(graph, dit_metadata(), path)


def describe(path: str) -> str:
    m = onnx.load(path)
    parts = []
    for kind, vis in (("in", m.graph.input), ("out", m.graph.output)):
        for vi in vis:
            tt = vi.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
            parts.append(f"{kind} {vi.name} {TensorProto.DataType.Name(tt.elem_type).lower()} {dims}")
    meta = ", ".join(f"{p.key}={p.value}" for p in m.metadata_props)
    return f"{os.path.basename(path)} ({os.path.getsize(path):,} bytes): {'; '.join(parts)}\n    {meta}"


def check(out: str):
    """Runs each model in onnxruntime at batch 1 and 64 and checks the output shapes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    rng = np.random.default_rng(0)
    c, h, w = LATENT
    for batch in (1, 64):
        sess = lambda name: ort.InferenceSession(os.path.join(out, name), opts, providers=["CPUExecutionProvider"])
        image = rng.uniform(-1, 1, (batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
        mean, logvar = sess("vae_encoder.onnx").run(["mean", "logvar"], {"image": image})
        latent = (rng.standard_normal((batch, c, h, w)) / SCALE_FACTOR).astype(np.float32)
        (decoded,) = sess("vae_decoder.onnx").run(["image"], {"latent": latent})
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        t = rng.integers(0, TRAIN_TIMESTEPS, batch).astype(np.int64)
        y = rng.integers(0, NUM_CLASSES + 1, batch).astype(np.int64)
        t[0], y[0] = TRAIN_TIMESTEPS - 1, NUM_CLASSES  # the extremes: last timestep, null class
        (pred,) = sess("dit.onnx").run(["out"], {"x": x, "t": t, "y": y})
        want = {
            "vae_encoder mean": (mean, (batch, c, h, w)),
            "vae_encoder logvar": (logvar, (batch, c, h, w)),
            "vae_decoder image": (decoded, (batch, 3, IMAGE_SIZE, IMAGE_SIZE)),
            "dit out": (pred, (batch, 2 * c, h, w)),
        }
        for what, (value, shape) in want.items():
            if value.shape != shape or value.dtype != np.float32 or not np.all(np.isfinite(value)):
                raise SystemExit(f"{what}: got {value.dtype} {value.shape}, expected float32 {shape} (finite)")
        assert np.all(logvar == 0) and np.all(np.abs(pred[:, c:]) <= 1)
        print(f"[check] batch {batch:2d}: mean {mean.shape} |mean| max {np.abs(mean).max():.2f}, "
              f"decoded {decoded.shape}, dit out {pred.shape} eps std {pred[:, :c].std():.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for vae_encoder.onnx, vae_decoder.onnx, dit.onnx")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(SEED)
    vae_encoder(rng, os.path.join(a.out, "vae_encoder.onnx"))
    vae_decoder(rng, os.path.join(a.out, "vae_decoder.onnx"))
    dit(rng, os.path.join(a.out, "dit.onnx"))
    check(a.out)
    for name in ("vae_encoder.onnx", "vae_decoder.onnx", "dit.onnx"):
        print(describe(os.path.join(a.out, name)))


if __name__ == "__main__":
    sys.exit(main())
