#!/usr/bin/env python3
"""Per-step latent sizes of MGD3 sampling at several guidance scales, with the independent numpy
reference step (mgd3ref.ddpm_sample, as scripts/parity_reference.py; not the Rust worker): shows where
guidance runs away.

    venv/bin/python scripts/guidance_trace.py                      # demo DiT, sandals, lambda 0.1 0.2 0.4
    venv/bin/python scripts/guidance_trace.py --class 08_bag --lambdas 0.1 0.3 --t-stop 10

Images get the worker's preprocessing (mgd3ref.load_images: grey, at the encoder's mgd3.image_size,
32x32 for the demo models).  Modes are the scaled VAE posterior means of the first IPC training images
of the class (a stand-in for k-means centroids: any on-manifold latent shows the effect); the noise is
numpy default_rng(seed).  For each lambda it prints, at a few steps i, the RMS of the latent x_i, of
x0_hat - mode, of the guidance term lambda*sigma*(mode - x0_hat) and the mean sigma.  The worker fails
a sample whose latent RMS exceeds 10x its mode's (see worker/src/mgd3/sampler.rs), which a run-away
trajectory crosses within a few steps.  Needs numpy, Pillow and onnxruntime only (no torch).
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

import mgd3ref as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 50
SHOW = (49, 48, 47, 46, 45, 42, 38, 34, 30, 26, 20, 10, 0)


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64)))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.path.join(ROOT, "models", "demo"))
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "fashion-mnist", "train"))
    ap.add_argument("--class", dest="cls", default="05_sandal", help="class folder under --data")
    ap.add_argument("--label", type=int, default=None, help="DiT label (default: position of the class folder)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    ap.add_argument("--t-stop", type=int, default=25)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--cfg-channels", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import onnxruntime as ort

    dit = R.ort_session(os.path.join(a.models, "fashion_mnist_dit.onnx"))
    md = R.model_meta(dit)
    enc = ort.InferenceSession(os.path.join(a.models, "fashion_mnist_vae_encoder.onnx"),
                               providers=["CPUExecutionProvider"])
    emd = enc.get_modelmeta().custom_metadata_map
    scale = float(emd["mgd3.scale_factor"])
    files = sorted(glob.glob(os.path.join(a.data, a.cls, "*.png")))[: a.ipc]
    if len(files) < a.ipc:
        raise SystemExit(f"class `{a.cls}`: {len(files)} images under {a.data} (need {a.ipc})")
    label = a.label if a.label is not None else sorted(os.listdir(a.data)).index(a.cls)
    images = R.load_images(files, int(emd["mgd3.image_size"]))
    modes = enc.run(["mean"], {"image": images})[0] * np.float32(scale)
    sch = R.DdpmSchedule(int(md["mgd3.train_timesteps"]), STEPS, float(md["mgd3.beta_start"]),
                         float(md["mgd3.beta_end"]))
    noise = np.random.default_rng(a.seed).standard_normal((a.ipc, STEPS + 1) + modes.shape[1:]).astype(np.float32)
    print(f"class {a.cls} (label {label}), {a.ipc} samples, t_stop {a.t_stop}, CFG {a.cfg_scale:g} on "
          f"{a.cfg_channels} channels; mode RMS {rms(modes):.3f}")
    for lam in a.lambdas:
        rows = []

        def trace(i, x, x0, g, sigma):
            rows.append((i, rms(x), rms(x0 - modes), rms(g) if g is not None else 0.0, float(sigma.mean())))

        traj = R.ddpm_sample(dit, sch, int(md["mgd3.num_classes"]), modes, noise, label, a.t_stop, lam, a.cfg_scale,
                        a.cfg_channels, trace=trace)
        print(f"\nlambda {lam:g}:   i   RMS x_i  RMS(x0-m)  RMS guidance  mean sigma")
        for i, rx, rd, rg, sg in rows:
            if i in SHOW:
                print(f"           {i:2d} {rx:9.3g} {rd:10.3g} {rg:13.3g} {sg:11.3f}")
        print(f"  final x_0: RMS {rms(traj[:, -1]):.3g}, RMS(x_0 - mode) {rms(traj[:, -1] - modes):.3g}")


if __name__ == "__main__":
    main()
