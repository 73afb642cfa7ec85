#!/usr/bin/env python3
"""Reference PNG pixels for the whole-job parity test (tests/tests/parity_job.rs).

    /tmp/venv/bin/python scripts/parity_reference_job.py [--root .]

For every case folder tests/fixtures/parity_job/<case>/ that holds the job's inputs (written by
`MGD3_WRITE_PARITY_JOB_INPUTS=1 cargo test -p mgd3-tests --test parity_job`: params.json, and per
class <wnid>_modes.npy [IPC,C,h,w] and <wnid>_noise.npy [IPC,S+1,C,h,w]), it samples each class on its
own, one ORT call per step on the class's IPC samples (no mixing of classes, unlike the job), with the
independent numpy samplers of scripts/mgd3ref.py (ddpm_sample: MGD3-SPEC.md sec. 2.2; ddim_sample: the
paper's Algorithm 1), decodes with tiny_vae_decoder.onnx and writes <wnid>_images.npy (u8 [IPC,h,w,3]:
clamp(decoded, -1, 1) -> (x+1)/2 -> floor(255 v + 0.5)). Uses only numpy, json and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mgd3ref import DdimSchedule, DdpmSchedule, ddim_sample, ddpm_sample, model_meta, ort_session, save_npy, to_uint8_hwc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()

    mdir = os.path.join(a.root, "tests", "fixtures", "models")
    dit = ort_session(os.path.join(mdir, "tiny_dit.onnx"))
    md = model_meta(dit)
    assert md["mgd3.kind"] == "dit" and md["mgd3.beta_schedule"] == "linear"
    T = int(md["mgd3.train_timesteps"])
    beta_start, beta_end = float(md["mgd3.beta_start"]), float(md["mgd3.beta_end"])
    num_classes = int(md["mgd3.num_classes"])
    dec = ort_session(os.path.join(mdir, "tiny_vae_decoder.onnx"))
    scale = np.float32(float(model_meta(dec)["mgd3.scale_factor"]))

    root = os.path.join(a.root, "tests", "fixtures", "parity_job")
    for case in sorted(os.listdir(root)):
        cdir = os.path.join(root, case)
        if not os.path.isfile(os.path.join(cdir, "params.json")):
            continue
        with open(os.path.join(cdir, "params.json")) as f:
            p = json.load(f)
        S = p["steps"]
        if p["sampler"] == "ddpm":
            sch = DdpmSchedule(T, S, beta_start, beta_end)
        elif p["sampler"] == "ddim":
            sch = DdimSchedule(T, S, beta_start, beta_end)
        else:
            raise SystemExit(f"{case}: unknown sampler {p['sampler']!r}")
        for c in p["classes"]:
            wnid, label = c["wnid"], c["label"]
            modes = np.load(os.path.join(cdir, f"{wnid}_modes.npy")).astype(np.float32)
            noise = np.load(os.path.join(cdir, f"{wnid}_noise.npy")).astype(np.float32)
            assert noise.shape[:2] == (p["ipc"], S + 1) and modes.shape[0] == p["ipc"], (noise.shape, modes.shape)
            if p["sampler"] == "ddpm":
                traj = ddpm_sample(dit, sch, num_classes, modes, noise, label, p["t_stop"], p["guidance_scale"],
                                   p["cfg_scale"], p["cfg_channels"])
            else:
                traj = ddim_sample(dit, sch, num_classes, modes, noise, label, p["t_stop"], p["guidance_scale"],
                                   p["cfg_scale"], p["cfg_channels"], p["eta"])
            lat = np.ascontiguousarray(traj[:, S])
            decoded = dec.run(["image"], {"latent": lat / scale})[0].astype(np.float32)
            img = to_uint8_hwc(decoded)
            save_npy(os.path.join(cdir, f"{wnid}_images.npy"), img)
            print(f"[{case}] {wnid} label {label}: latents mean {lat.mean():+.3f} std {lat.std():.3f}, "
                  f"rms(latent - mode) {float(np.sqrt(np.mean((lat - modes) ** 2))):.3f}, image mean {img.mean():.1f}")


if __name__ == "__main__":
    main()
