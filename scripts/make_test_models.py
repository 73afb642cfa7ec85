#!/usr/bin/env python3
"""Build the tiny ONNX test models and their goldens (tests/fixtures/models, tests/fixtures/goldens).

    /work/venv/bin/python scripts/make_test_models.py [--root .] [--skip-cli-check]

Everything is seeded and runs on the CPU with one torch thread.  The models use the
architectures of the real ones and go through the export functions of
scripts/export_onnx.py:

  tiny_dit.onnx / tiny_dit_fp16.onnx  original-DiT-style module (export_onnx.DiT): 4x8x8 latent,
      patch 2, depth 2, hidden 64, 4 heads, 10 classes (+ null class 10), learn_sigma.
      Every parameter is re-initialised (no adaLN-Zero zeros), then the model is trained for
      1500 Adam steps on a synthetic 10-class latent set (eps-prediction, 10 % label
      dropout) so that 50-step CFG + mode-guided sampling with it behaves like a diffusion
      model (latents of order 1) instead of blowing up like an untrained one (x grows by
      ~1/sqrt(abar) = 157x, and an inaccurate eps at high noise makes the guidance feed back).
  tiny_dit_diffusers.onnx  diffusers DiTTransformer2DModel with the same shape contract (random).
  tiny_vae_encoder.onnx / tiny_vae_decoder.onnx  diffusers AutoencoderKL (SD layout, 2 levels,
      block_out_channels (16, 32)): 16x16x3 image <-> 4x8x8 latent (random).

Self-checks: the DiT module is compared with diffusers' DiT after copying the weights over
(with diffusers' two known deviations from the original code switched off), and, unless
--skip-cli-check, the export_onnx.py command lines (--checkpoint / --diffusers / vae) are
run on saved copies of the tiny models and compared with the fixtures.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import export_onnx as E
import mgd3ref as R

NUM_CLASSES = 10
LATENT = (4, 8, 8)
IMAGE_SIZE = 16
SCALE_FACTOR = 0.18215


def reinit_(module: nn.Module, gain: float = 1.0, bias_std: float = 0.05, lo=0.02, hi=0.2,
            skip=("pos_embed",)):
    """Re-initialise every parameter with a seeded normal; no zeros, no ones."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.dim() >= 2:
                if "embedding" in name:
                    std = hi
                else:
                    fan_in = p[0].numel()
                    std = min(hi, max(lo, gain / math.sqrt(fan_in)))
                p.normal_(0.0, std)
            elif "norm" in name and "weight" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, bias_std)


# ---------------------------------------------------------------------------
# tiny original-style DiT: re-init + short training on a synthetic latent set
# ---------------------------------------------------------------------------

def linear_abar(T=1000):
    return torch.from_numpy(R.alphas_cumprod(R.linear_betas(T, 1e-4, 0.02))).float()


def synthetic_patterns(g: torch.Generator):
    """One smooth 4x8x8 pattern per class (std ~1)."""
    low = torch.randn(NUM_CLASSES, 4, 3, 3, generator=g)
    pat = F.interpolate(low, size=LATENT[1:], mode="bilinear", align_corners=True)
    return pat / pat.std(dim=(1, 2, 3), keepdim=True)


def synthetic_batch(pats, n, g):
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    jitter = F.interpolate(torch.randn(n, 4, 4, 4, generator=g), size=LATENT[1:], mode="bilinear",
                           align_corners=True)
    return pats[y] + 0.4 * jitter, y


def train_tiny_dit(model, steps, seed):
    """eps-prediction training.  At high noise x0 = 157*(x - eps) roughly, so the sampler (and the
    mode guidance, which feeds on x0) needs an accurate eps there: the loss weights t by the
    clamped inverse SNR (1-abar)/abar in [1, 100] and 30 % of every batch has t >= 800."""
    g = torch.Generator().manual_seed(seed)
    pats = synthetic_patterns(g)
    abar = linear_abar()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    model.train()
    bs = 128
    for it in range(steps):
        x0, y = synthetic_batch(pats, bs, g)
        drop = torch.rand(y.shape, generator=g) < 0.1
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        t = torch.randint(0, 1000, (bs,), generator=g)
        n_hi = int(0.3 * bs)
        t[:n_hi] = torch.randint(800, 1000, (n_hi,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = model(xt, t, y)
        w = ((1 - a) / a).clamp(1.0, 100.0)
        loss = (w * (out[:, :4] - eps) ** 2).mean() / w.mean() + 0.05 * out[:, 4:].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % 250 == 0 or it == steps - 1:
            print(f"[train] step {it:4d} loss {loss.item():.4f}")
    model.eval()
    return pats


@torch.no_grad()
def quick_sample(model, n=3, label=3, steps=50, cfg=4.0, lam=0.1, t_stop=0, seed=1):
    """Plain torch DDPM-50 CFG + mode-guidance sampler (mgd3ref.ddpm_sample_torch; sanity check only,
    parity_reference.py is the reference).  Returns (final x, max |x| over the trajectory)."""
    sch = R.DdpmSchedule(1000, steps, 1e-4, 0.02)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *LATENT, generator=g)
    modes = torch.randn(n, *LATENT, generator=g)
    peak = [x.abs().max().item()]

    def on_step(i, xi):
        peak[0] = max(peak[0], xi.abs().max().item())

    x = R.ddpm_sample_torch(model, sch, x, modes, label, NUM_CLASSES, t_stop, lam, cfg,
                            lambda like: torch.randn(like.shape, generator=g), on_step=on_step)
    return x, peak[0]


def build_tiny_dit(seed, train_steps):
    torch.manual_seed(seed)
    model = E.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  mlp_ratio=4.0, num_classes=NUM_CLASSES, learn_sigma=True)
    reinit_(model, gain=1.0, bias_std=0.05)
    pats = train_tiny_dit(model, train_steps, seed + 1)
    return model, pats


def crosscheck_against_diffusers(model):
    """Copy the original-style weights into diffusers' DiT and compare (validates export_onnx.DiT)."""
    from diffusers import DiTTransformer2DModel
    hid = model.x_embedder.proj.weight.shape[0]
    heads = model.blocks[0].attn.heads
    ref = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hid // heads, in_channels=4,
                                out_channels=8, num_layers=len(model.blocks), sample_size=8, patch_size=2,
                                num_embeds_ada_norm=NUM_CLASSES).eval()
    sd = model.state_dict()
    new = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(len(model.blocks)):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        e = d + "norm1.emb."
        new[e + "timestep_embedder.linear_1.weight"] = sd["t_embedder.mlp.0.weight"]
        new[e + "timestep_embedder.linear_1.bias"] = sd["t_embedder.mlp.0.bias"]
        new[e + "timestep_embedder.linear_2.weight"] = sd["t_embedder.mlp.2.weight"]
        new[e + "timestep_embedder.linear_2.bias"] = sd["t_embedder.mlp.2.bias"]
        new[e + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        new[d + "norm1.linear.weight"] = sd[b + "adaLN_modulation.1.weight"]
        new[d + "norm1.linear.bias"] = sd[b + "adaLN_modulation.1.bias"]
        for nm, w in zip("qkv", sd[b + "attn.qkv.weight"].chunk(3, 0)):
            new[d + f"attn1.to_{nm}.weight"] = w
        for nm, w in zip("qkv", sd[b + "attn.qkv.bias"].chunk(3, 0)):
            new[d + f"attn1.to_{nm}.bias"] = w
        new[d + "attn1.to_out.0.weight"] = sd[b + "attn.proj.weight"]
        new[d + "attn1.to_out.0.bias"] = sd[b + "attn.proj.bias"]
        new[d + "ff.net.0.proj.weight"] = sd[b + "mlp.fc1.weight"]
        new[d + "ff.net.0.proj.bias"] = sd[b + "mlp.fc1.bias"]
        new[d + "ff.net.2.weight"] = sd[b + "mlp.fc2.weight"]
        new[d + "ff.net.2.bias"] = sd[b + "mlp.fc2.bias"]
    missing, unexpected = ref.load_state_dict(new, strict=False)
    missing = [k for k in missing if "pos_embed.pos_embed" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    # diffusers' deliberate deviations from the original DiT code: switch them off
    for blk in ref.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
        blk.norm3.eps = 1e-6  # the pre-MLP LayerNorm (norm2 is None without cross-attention)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, *LATENT, generator=g)
    t = torch.tensor([0, 20, 530, 999])
    y = torch.tensor([0, 3, 9, NUM_CLASSES])
    with torch.no_grad():
        a = model(x, t, y)
        b_ = ref(x, timestep=t, class_labels=y).sample
    err = (a - b_).abs().max().item()
    print(f"[crosscheck] export_onnx.DiT vs diffusers DiT (same weights, shift 0, eps 1e-6): max abs {err:.2e}")
    assert err < 1e-4, err


# ---------------------------------------------------------------------------

def build_tiny_diffusers_dit(seed):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES).eval()
    reinit_(m, gain=1.0, bias_std=0.05)
    return m


def build_tiny_vae(seed):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(16, 32), layers_per_block=1, act_fn="silu", latent_channels=4,
                        norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=SCALE_FACTOR).eval()
    reinit_(vae, gain=1.0, bias_std=0.05, lo=0.02, hi=0.5)
    return vae


def ort_run(path, feed):
    sess = E.ort_session(path)
    return sess.run(None, feed)


def cli_check(model, dmodel, vae, mdir):
    """Run the export_onnx.py command lines on saved copies and compare with the fixtures."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_onnx.py")
    g = np.random.default_rng(11)
    x = g.standard_normal((2, *LATENT)).astype(np.float32)
    feed = {"x": x, "t": np.array([5, 900], np.int64), "y": np.array([2, NUM_CLASSES], np.int64)}
    img = {"image": g.uniform(-1, 1, (2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)}
    lat = {"latent": g.standard_normal((2, *LATENT)).astype(np.float32) * 5}
    with tempfile.TemporaryDirectory() as tmp:
        ck = os.path.join(tmp, "tiny-dit.pt")
        torch.save({"ema": model.state_dict(), "args": None}, ck)
        pipe = os.path.join(tmp, "pipe")
        dmodel.save_pretrained(os.path.join(pipe, "transformer"))
        vae.save_pretrained(os.path.join(tmp, "vae"))
        runs = [
            (["dit", "--checkpoint", ck, "--num-heads", "4", "--out", os.path.join(tmp, "a.onnx")],
             [("a.onnx", "tiny_dit.onnx", feed)]),
            (["dit", "--diffusers", pipe, "--out", os.path.join(tmp, "b.onnx")],
             [("b.onnx", "tiny_dit_diffusers.onnx", feed)]),
            (["vae", "--diffusers", os.path.join(tmp, "vae"), "--out-dir", tmp],
             [("vae_encoder.onnx", "tiny_vae_encoder.onnx", img), ("vae_decoder.onnx", "tiny_vae_decoder.onnx", lat)]),
        ]
        for args, comps in runs:
            print(f"[cli] export_onnx.py {' '.join(args)}")
            r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:])
                raise SystemExit(f"CLI export failed: {args}")
            for line in r.stdout.splitlines():
                if line.startswith(("[check]", "[dit] config")):
                    print("   ", line)
            for got, want, fd in comps:
                a = ort_run(os.path.join(tmp, got), fd)
                b = ort_run(os.path.join(mdir, want), fd)
                err = max(float(np.max(np.abs(p - q))) for p, q in zip(a, b))
                print(f"[cli] {got} vs {want}: max abs {err:.2e}")
                assert err < 1e-5, err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--seed", type=int, default=20261128)
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--skip-cli-check", action="store_true")
    ap.add_argument("--only-fused", action="store_true",
                    help="only rewrite the fused fixtures from the plain ones already there")
    a = ap.parse_args()
    torch.set_num_threads(1)
    mdir = os.path.join(a.root, "tests", "fixtures", "models")
    gdir = os.path.join(a.root, "tests", "fixtures", "goldens")
    os.makedirs(mdir, exist_ok=True)
    os.makedirs(gdir, exist_ok=True)
    errs = {}
    if a.only_fused:
        errs = readme_errors(mdir)
        errs.update(fuse_fixtures(mdir))
        write_readme(mdir, errs)
        return

    # --- tiny original-style DiT ---
    model, _ = build_tiny_dit(a.seed, a.train_steps)
    crosscheck_against_diffusers(model)
    for lab, t_stop in ((3, 50), (3, 25), (3, 0), (NUM_CLASSES, 50)):
        xs, peak = quick_sample(model, label=lab, t_stop=t_stop)
        print(f"[sanity] torch 50-step CFG sample (label {lab}, t_stop {t_stop}): mean {xs.mean():.3f} "
              f"std {xs.std():.3f} max|x_0| {xs.abs().max():.3f} max|x| over trajectory {peak:.2f}")
        assert peak < 20.0, "tiny DiT sampling is not numerically sane"
    common = dict(in_channels=4, input_size=8, num_classes=NUM_CLASSES, learn_sigma=True,
                  source="mgd3-test:tiny-dit-original", external_data=False)
    errs["tiny_dit.onnx"] = E.export_dit(model, os.path.join(mdir, "tiny_dit.onnx"), **common)
    errs["tiny_dit_fp16.onnx"] = E.export_dit(model, os.path.join(mdir, "tiny_dit_fp16.onnx"), fp16=True, **common)

    # --- tiny diffusers DiT ---
    dmodel = build_tiny_diffusers_dit(a.seed + 2)
    errs["tiny_dit_diffusers.onnx"] = E.export_diffusers_dit(
        dmodel, os.path.join(mdir, "tiny_dit_diffusers.onnx"), source="mgd3-test:tiny-dit-diffusers")

    # --- tiny VAE ---
    vae = build_tiny_vae(a.seed + 3)
    e1, e2 = E.export_vae(vae, os.path.join(mdir, "tiny_vae_encoder.onnx"), os.path.join(mdir, "tiny_vae_decoder.onnx"),
                          image_size=IMAGE_SIZE, scale_factor=SCALE_FACTOR, source="mgd3-test:tiny-vae",
                          external_data=False)
    errs["tiny_vae_encoder.onnx"], errs["tiny_vae_decoder.onnx"] = e1, e2

    # --- goldens (onnxruntime CPU outputs) ---
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((3, *LATENT)).astype(np.float32)
    t = np.array([999, 412, 0], dtype=np.int64)
    y = np.array([3, NUM_CLASSES, 7], dtype=np.int64)
    R.save_npy(os.path.join(gdir, "dit_x.npy"), x)
    R.save_npy(os.path.join(gdir, "dit_t.npy"), t)
    R.save_npy(os.path.join(gdir, "dit_y.npy"), y)
    out = ort_run(os.path.join(mdir, "tiny_dit.onnx"), {"x": x, "t": t, "y": y})[0]
    R.save_npy(os.path.join(gdir, "dit_out.npy"), out.astype(np.float32))
    out16 = ort_run(os.path.join(mdir, "tiny_dit_fp16.onnx"), {"x": x.astype(np.float16), "t": t, "y": y})[0]
    assert out16.dtype == np.float16
    R.save_npy(os.path.join(gdir, "dit_fp16_out.npy"), out16.astype(np.float32))
    outd = ort_run(os.path.join(mdir, "tiny_dit_diffusers.onnx"), {"x": x, "t": t, "y": y})[0]
    R.save_npy(os.path.join(gdir, "dit_diffusers_out.npy"), outd.astype(np.float32))
    print(f"[golden] dit_out std {out.std():.3f} max {np.abs(out).max():.3f}; |fp16-fp32| max "
          f"{np.abs(out16.astype(np.float32) - out).max():.2e}; diffusers out std {outd.std():.3f}")
    # the output must depend on t and y
    alt = ort_run(os.path.join(mdir, "tiny_dit.onnx"), {"x": x, "t": t[::-1].copy(), "y": y})[0]
    alt2 = ort_run(os.path.join(mdir, "tiny_dit.onnx"), {"x": x, "t": t, "y": np.array([0, 0, 0], np.int64)})[0]
    print(f"[golden] dit: max|out(t') - out| {np.abs(alt - out).max():.3f}, max|out(y') - out| {np.abs(alt2 - out).max():.3f}")
    assert np.abs(alt - out).max() > 0.05 and np.abs(alt2 - out).max() > 0.05

    img = rng.uniform(-1, 1, (2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    mean, logvar = ort_run(os.path.join(mdir, "tiny_vae_encoder.onnx"), {"image": img})
    R.save_npy(os.path.join(gdir, "vae_enc_image.npy"), img)
    R.save_npy(os.path.join(gdir, "vae_enc_mean.npy"), mean.astype(np.float32))
    R.save_npy(os.path.join(gdir, "vae_enc_logvar.npy"), logvar.astype(np.float32))
    lat = (rng.standard_normal((2, *LATENT)) / SCALE_FACTOR).astype(np.float32)  # unscaled latents
    dimg = ort_run(os.path.join(mdir, "tiny_vae_decoder.onnx"), {"latent": lat})[0]
    R.save_npy(os.path.join(gdir, "vae_dec_latent.npy"), lat)
    R.save_npy(os.path.join(gdir, "vae_dec_image.npy"), dimg.astype(np.float32))
    print(f"[golden] vae mean std {mean.std():.3f}, logvar range [{logvar.min():.2f}, {logvar.max():.2f}], "
          f"decoded image mean {dimg.mean():.3f} std {dimg.std():.3f} frac|x|>1 {(np.abs(dimg) > 1).mean():.2f}")

    if not a.skip_cli_check:
        cli_check(model, dmodel, vae, mdir)

    errs.update(fuse_fixtures(mdir))
    write_readme(mdir, errs)
    print("[errors] max abs torch-vs-ORT:", {k: f"{v:.2e}" for k, v in errs.items()})


FUSED = ["tiny_dit.onnx", "tiny_vae_encoder.onnx", "tiny_vae_decoder.onnx"]


def fused_name(name):
    return name.replace(".onnx", "_fused.onnx")


def fuse_fixtures(mdir):
    """The fused graphs of the fp32 fixtures (export_onnx.py fuse), checked against them (1e-4
    relative).  Returns {fused file: max relative difference to the plain one}."""
    errs = {}
    for name in FUSED:
        plain, fused = os.path.join(mdir, name), os.path.join(mdir, fused_name(name))
        E.fuse_onnx(plain, fused, external_data=False)
        errs[fused_name(name)] = E.compare_onnx(plain, fused, tol=1e-4)
    return errs


def readme_errors(mdir):
    """The last column of the README's table, to keep when only the fused fixtures are rebuilt."""
    errs = {}
    path = os.path.join(mdir, "README.md")
    for line in open(path) if os.path.exists(path) else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`tiny_"):
            try:
                errs[cells[0].strip("`")] = float(cells[3])
            except ValueError:
                pass
    return errs


def write_readme(mdir, errs):
    names = ["tiny_dit.onnx", "tiny_dit_fp16.onnx", "tiny_dit_diffusers.onnx", "tiny_vae_encoder.onnx",
             "tiny_vae_decoder.onnx"] + [fused_name(n) for n in FUSED]
    rows = []
    for n in names:
        shapes = E.onnx_io_shapes(os.path.join(mdir, n))
        io = "; ".join(f"{k} {v[1].lower()} [{', '.join(str(d) for d in v[2])}]" for k, v in shapes.items())
        rows.append(f"| `{n}` | {os.path.getsize(os.path.join(mdir, n)):,} | {io} | {errs.get(n, float('nan')):.1e} |")
    text = """# Tiny ONNX test models

Generated by `scripts/make_test_models.py` (do not edit by hand):

    python3 -m venv /work/venv && /work/venv/bin/pip install -r scripts/requirements-export.txt
    /work/venv/bin/python scripts/make_test_models.py

It also writes the goldens in `tests/fixtures/goldens/` (inputs and onnxruntime 1.31.1 CPU outputs), and
`scripts/parity_reference.py` builds `tests/fixtures/parity/` from `tiny_dit.onnx` + `tiny_vae_decoder.onnx`.
All models come from the export functions of `scripts/export_onnx.py` (torch.onnx dynamo, opset 18,
dynamic batch dim `batch`) and carry the `mgd3.*` metadata of the model contract (docs/ARCHITECTURE.md).

- `tiny_dit.onnx`: the original-DiT-style module of `export_onnx.py` (parameter names of
  facebookresearch/DiT): latent 4x8x8, patch 2, depth 2, hidden 64, 4 heads, mlp ratio 4,
  10 classes + null class 10, learn_sigma (8 output channels: eps, then v). Every parameter was
  re-initialised from a seeded normal (no adaLN-Zero zeros) and then trained for 1500 Adam
  steps on a synthetic 10-class latent set, so that 50-step CFG and mode-guided sampling stays at latents of order 1.
  Metadata: num_classes 10, learn_sigma true, train_timesteps 1000, linear 0.0001..0.02.
- `tiny_dit_fp16.onnx`: the same weights in fp16; `x` and `out` are float16, `t`/`y` int64.
- `tiny_dit_diffusers.onnx`: a random diffusers `DiTTransformer2DModel` with the same shape contract
  (proves the `--diffusers` path; diffusers' timestep embedding differs slightly from the original's).
- `tiny_vae_encoder.onnx` / `tiny_vae_decoder.onnx`: a random diffusers `AutoencoderKL` in SD layout
  (3 channels, latent 4, block_out_channels (16, 32), layers_per_block 1, norm groups 8):
  image 3x16x16 in [-1, 1] -> `mean`, `logvar` 4x8x8 (unscaled; logvar clamped to [-30, 20] as in
  diffusers) and `latent` 4x8x8 (unscaled) -> `image` 3x16x16. scale_factor 0.18215, image_size 16.
- `tiny_dit_fused.onnx`, `tiny_vae_encoder_fused.onnx`, `tiny_vae_decoder_fused.onnx`: the same models
  rewritten by `export_onnx.py fuse` (com.microsoft.MultiHeadAttention / Attention, FastGelu; metadata
  `mgd3.graph = fused`); their last column is the largest difference to the plain model, relative to
  max(1, max|out|). `--only-fused` rebuilds just these.

| file | bytes | inputs / outputs (onnx shapes) | max abs ORT vs torch (fp32 ref) |
|---|---|---|---|
""" + "\n".join(rows) + "\n"
    with open(os.path.join(mdir, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
