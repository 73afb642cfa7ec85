#!/usr/bin/env python3
"""Train the demo model pair (VAE + class-conditional DiT) on Fashion-MNIST and export it to ONNX.

    /work/venv/bin/python scripts/train_demo_models.py [--root .] [--seed 0]

Writes models/demo/{fashion_mnist_dit,fashion_mnist_vae_encoder,fashion_mnist_vae_decoder}.onnx,
models/demo/loss_curve.png and models/demo/samples.png (see models/demo/MODEL_CARD.md).
Seeded, torch on the CPU with one thread (about 25 minutes on the development machine).

Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz, IDX, read with numpy by
scripts/mgd3ref.py).  Preprocessing is the Rust worker's for 28x28 grey images at S = 32 (mgd3ref's
center_crop_arr: a Pillow BICUBIC resize to 32x32 here, no halving or cropping), v/255,
Normalize(0.5, 0.5), one channel.  Label k = Fashion-MNIST label k (= position of the class folder 00_tshirt_top ..
09_ankle_boot in sorted order); the null class for classifier-free guidance is 10.

1. VAE: diffusers AutoencoderKL in the SD layout (3 levels, block_out_channels (16, 32, 32), one
   ResNet per level, attention in the mid block), 1x32x32 <-> 4x8x8, trained with MSE
   reconstruction + a small KL term.  scale_factor = 1 / std of the training latents' posterior
   means.
2. DiT: scripts/export_onnx.py's DiT (original facebookresearch/DiT parameter layout and maths),
   input 4x8x8, patch 2, learn_sigma (8 output channels: eps, then the variance interpolation v),
   original DiT initialisation (adaLN-Zero), trained on scaled latents sampled from the posterior
   with the hybrid loss of improved DDPM / DiT (eps MSE + the VLB term with a stop-gradient on the
   mean), linear betas 1e-4..0.02, T = 1000, 10 % label dropout to the null class; EMA weights are
   exported.
3. Export with export_onnx.py (mgd3.* metadata, ORT-vs-torch check), then a 10x8 sample grid with
   50-step DDPM + CFG 4 through ONNX Runtime using the parity reference's sampler (mgd3ref), and a
   held-out check: a small CNN trained on the real training images classifies the generated ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import export_onnx as E
import mgd3ref as R

HERE = os.path.dirname(os.path.abspath(__file__))

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ["tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot"]
NUM_CLASSES = 10
IMAGE_SIZE = 32
LATENT = (4, 8, 8)
T = 1000
BETA_START, BETA_END = 1e-4, 0.02

VAE_CONFIG = dict(in_channels=1, out_channels=1,
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(16, 32, 32), layers_per_block=1, act_fn="silu", latent_channels=4,
                  norm_num_groups=8, sample_size=IMAGE_SIZE)
DIT_CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=4, num_heads=4,
                  mlp_ratio=4.0, num_classes=NUM_CLASSES, learn_sigma=True)

T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def load_split(split: str, data_dir: str = DATA_DIR):
    return R.load_idx_split(data_dir, split)


def center_crop_u8(images: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N,28,28] -> uint8 [N,size,size]: the worker's center_crop_arr (a BICUBIC resize here)."""
    from PIL import Image
    out = np.empty((len(images), size, size), np.uint8)
    for i, im in enumerate(images):
        out[i] = np.asarray(R.center_crop_arr(Image.fromarray(im), size))
    return out


def to_model(u8: np.ndarray) -> torch.Tensor:
    """uint8 [N,S,S] -> float32 [N,1,S,S] in [-1,1]: ToTensor then Normalize(0.5, 0.5)."""
    return torch.from_numpy(R.normalize_u8(u8)).unsqueeze(1)


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------

def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(**VAE_CONFIG)


def warmup_cosine(opt, steps: int, warm: int, floor: float):
    """Linear warm-up over `warm` steps, then cosine decay from 1 to `floor` at `steps`."""
    def factor(k):
        cosine = 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
        return min(1.0, (k + 1) / warm) * (floor + (1 - floor) * cosine)
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def batch_indices(n: int, bs: int, steps: int, g: torch.Generator):
    """`steps` batches of `bs` indices into n items: a fresh permutation whenever one runs out."""
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + bs]
        pos += bs


def train_vae(vae, x: torch.Tensor, steps: int, bs: int, lr: float, kl_weight: float, g: torch.Generator,
              curve: list):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warm=100, floor=0.05)
    vae.train()
    acc = [0.0, 0.0, 0]
    for it, idx in enumerate(batch_indices(len(x), bs, steps, g)):
        xb = x[idx]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, xb)
        kl = post.kl().mean() / (IMAGE_SIZE * IMAGE_SIZE)  # per pixel
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc[0] += mse.item()
        acc[1] += kl.item()
        acc[2] += 1
        if (it + 1) % 50 == 0 or it == steps - 1:
            curve.append((it + 1, acc[0] / acc[2], acc[1] / acc[2]))
            if (it + 1) % 250 == 0 or it == steps - 1:
                log(f"vae step {it + 1:5d}/{steps} mse {acc[0] / acc[2]:.5f} kl/pixel {acc[1] / acc[2]:.4f}")
            acc = [0.0, 0.0, 0]
    vae.eval()


@torch.no_grad()
def encode_all(vae, x: torch.Tensor, bs: int = 500):
    means, logvars = [], []
    for i in range(0, len(x), bs):
        post = vae.encode(x[i:i + bs]).latent_dist
        means.append(post.mean)
        logvars.append(post.logvar)
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def recon_mse(vae, x: torch.Tensor, bs: int = 500) -> float:
    tot = 0.0
    for i in range(0, len(x), bs):
        xb = x[i:i + bs]
        tot += F.mse_loss(vae.decode(vae.encode(xb).latent_dist.mean).sample, xb, reduction="sum").item()
    return tot / x.numel()


# ---------------------------------------------------------------------------
# DiT: original initialisation, diffusion maths of guided_diffusion (hybrid loss)
# ---------------------------------------------------------------------------

def build_dit():
    model = E.DiT(**DIT_CONFIG)
    # facebookresearch/DiT models.py initialize_weights()
    def _basic(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    model.apply(_basic)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.constant_(model.x_embedder.proj.bias, 0)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for blk in model.blocks:
        nn.init.constant_(blk.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(blk.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.linear.weight, 0)
    nn.init.constant_(model.final_layer.linear.bias, 0)
    return model


class Diffusion:
    """The float64 arrays of guided_diffusion.GaussianDiffusion (linear betas, T = 1000)."""

    def __init__(self):
        b = R.linear_betas(T, BETA_START, BETA_END)
        abar = R.alphas_cumprod(b)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        f = lambda a: torch.from_numpy(a).float()  # noqa: E731
        self.sqrt_abar = f(np.sqrt(abar))
        self.sqrt_1m_abar = f(np.sqrt(1.0 - abar))
        self.sqrt_recip_abar = f(np.sqrt(1.0 / abar))
        self.sqrt_recipm1_abar = f(np.sqrt(1.0 / abar - 1.0))
        self.post_log_var = f(np.log(np.append(post_var[1], post_var[1:])))  # "clipped": min_log
        self.log_betas = f(np.log(b))  # max_log
        self.c1 = f(b * np.sqrt(abar_prev) / (1.0 - abar))
        self.c2 = f((1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar))

    @staticmethod
    def _g(a, t):
        return a[t].view(-1, 1, 1, 1)

    def losses(self, model, x0, t, y, noise):
        """DiT training loss (LossType.MSE with learned-range variance): mse(eps) + vb (bits/dim)."""
        g = self._g
        xt = g(self.sqrt_abar, t) * x0 + g(self.sqrt_1m_abar, t) * noise
        out = model(xt, t, y)
        C = x0.shape[1]
        eps, v = out[:, :C], out[:, C:]
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        # vb term: the mean is frozen (stop-gradient), only the variance learns from it
        eps_d = eps.detach()
        x0_hat = g(self.sqrt_recip_abar, t) * xt - g(self.sqrt_recipm1_abar, t) * eps_d
        mean_p = g(self.c1, t) * x0_hat + g(self.c2, t) * xt
        frac = (v + 1) / 2
        logvar_p = frac * g(self.log_betas, t) + (1 - frac) * g(self.post_log_var, t)
        mean_q = g(self.c1, t) * x0 + g(self.c2, t) * xt
        logvar_q = g(self.post_log_var, t)
        kl = 0.5 * (-1.0 + logvar_p - logvar_q + torch.exp(logvar_q - logvar_p)
                    + (mean_q - mean_p) ** 2 * torch.exp(-logvar_p))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean_p, 0.5 * logvar_p).mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse, vb


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """guided_diffusion.losses.discretized_gaussian_log_likelihood (used by DiT at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


@torch.no_grad()
def ema_update(ema, model, decay):
    pe = list(ema.parameters())
    pm = [p.detach() for p in model.parameters()]
    torch._foreach_mul_(pe, decay)
    torch._foreach_add_(pe, pm, alpha=1 - decay)


def train_dit(model, ema, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, sf: float, steps: int,
              bs: int, lr: float, ema_decay: float, g: torch.Generator, curve: list):
    diff = Diffusion()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps, warm=200, floor=0.1)
    model.train()
    acc = [0.0, 0.0, 0]
    for it, idx in enumerate(batch_indices(len(mean), bs, steps, g)):
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * sf
        y = labels[idx].clone()
        y[torch.rand(bs, generator=g) < 0.1] = NUM_CLASSES
        t = torch.randint(0, T, (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        mse, vb = diff.losses(model, x0, t, y, noise)
        loss = (mse + vb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(ema_decay, (1 + it) / (10 + it)))
        acc[0] += mse.mean().item()
        acc[1] += vb.mean().item()
        acc[2] += 1
        if (it + 1) % 50 == 0 or it == steps - 1:
            curve.append((it + 1, acc[0] / acc[2], acc[1] / acc[2]))
            if (it + 1) % 250 == 0 or it == steps - 1:
                log(f"dit step {it + 1:5d}/{steps} mse {acc[0] / acc[2]:.4f} vb {acc[1] / acc[2]:.4f}")
            acc = [0.0, 0.0, 0]
    model.eval()
    ema.eval()


# ---------------------------------------------------------------------------
# sampling through ONNX Runtime (the parity reference's sampler) and a CNN check
# ---------------------------------------------------------------------------

def sample_grid_onnx(dit_path: str, dec_path: str, per_class: int, seed: int, cfg_scale: float = 4.0,
                     cfg_channels: int = 4, steps: int = 50):
    """Unguided (t_stop = steps) 50-step DDPM + CFG with ORT.  Returns uint8 [10, per_class, S, S]."""
    dit, dec = R.ort_session(dit_path), R.ort_session(dec_path)
    md = R.model_meta(dit)
    sch = R.DdpmSchedule(int(md["mgd3.train_timesteps"]), steps, float(md["mgd3.beta_start"]),
                         float(md["mgd3.beta_end"]))
    scale = np.float32(float(R.model_meta(dec)["mgd3.scale_factor"]))
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(NUM_CLASSES):
        modes = np.zeros((per_class, *LATENT), np.float32)  # unused: t_stop = steps
        noise = rng.standard_normal((per_class, steps + 1, *LATENT)).astype(np.float32)
        traj = R.ddpm_sample(dit, sch, int(md["mgd3.num_classes"]), modes, noise, label, steps, 0.0, cfg_scale,
                             cfg_channels)
        lat = np.ascontiguousarray(traj[:, steps])
        img = dec.run(["image"], {"latent": lat / scale})[0].astype(np.float32)
        rows.append(R.to_uint8_hwc(img)[..., 0])
    return np.stack(rows)


def save_grid(path: str, grid_u8: np.ndarray, pad: int = 2, upscale: int = 2):
    from PIL import Image
    r, c, h, w = grid_u8.shape
    canvas = np.full((r * (h + pad) + pad, c * (w + pad) + pad), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = grid_u8[i, j]
    im = Image.fromarray(canvas, mode="L")
    if upscale > 1:
        im = im.resize((im.width * upscale, im.height * upscale), Image.NEAREST)
    im.save(path)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                               nn.Flatten(), nn.Linear(256, NUM_CLASSES))

    def forward(self, x):
        return self.f(x)


def train_checker(x: torch.Tensor, y: torch.Tensor, steps: int, g: torch.Generator):
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    n = len(x)
    for it in range(steps):
        idx = torch.randint(0, n, (128,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, x, y, bs=1000):
    pred = torch.cat([net(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])
    return (pred == y).float().mean().item(), pred


# ---------------------------------------------------------------------------

def plot_curves(path, vae_curve, dit_curve, vae_steps_per_epoch, dit_steps_per_epoch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    s = np.array(vae_curve)
    ax[0].plot(s[:, 0] / vae_steps_per_epoch, s[:, 1], label="reconstruction MSE")
    ax[0].set_yscale("log")
    ax0b = ax[0].twinx()
    ax0b.plot(s[:, 0] / vae_steps_per_epoch, s[:, 2], color="tab:orange", label="KL / pixel")
    ax[0].set_xlabel("epoch")
    ax[0].set_title("VAE (mean of each 50 steps)")
    ax[0].legend(loc="upper left")
    ax0b.legend(loc="upper right")
    d = np.array(dit_curve)
    ax[1].plot(d[:, 0] / dit_steps_per_epoch, d[:, 1], label="eps MSE")
    ax[1].plot(d[:, 0] / dit_steps_per_epoch, d[:, 2], label="VLB term (bits/dim)")
    ax[1].plot(d[:, 0] / dit_steps_per_epoch, d[:, 1] + d[:, 2], label="total", alpha=0.6)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("epoch")
    ax[1].set_title("DiT hybrid loss (mean of each 50 steps)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(HERE))
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=64)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the per-pixel KL")
    ap.add_argument("--dit-steps", type=int, default=5000)
    ap.add_argument("--dit-batch", type=int, default=128)
    ap.add_argument("--dit-lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--check-steps", type=int, default=500, help="steps of the CNN that checks the samples")
    ap.add_argument("--summary-json", default=None, help="also write a JSON summary (losses, timings) here")
    ap.add_argument("--cache", default=None, help="dev: directory to cache/reuse the trained torch models")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    out_dir = os.path.join(a.root, "models", "demo")
    os.makedirs(out_dir, exist_ok=True)
    timings = {}

    t = time.time()
    xtr_raw, ytr = load_split("train", a.data_dir)
    xte_raw, yte = load_split("test", a.data_dir)
    xtr, xte = to_model(center_crop_u8(xtr_raw)), to_model(center_crop_u8(xte_raw))
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    timings["data"] = time.time() - t
    log(f"data: train {tuple(xtr.shape)}, test {tuple(xte.shape)} in [{xtr.min():.0f}, {xtr.max():.0f}]")

    # --- VAE ---
    t = time.time()
    vae_curve = []
    vae = build_vae()
    cached = a.cache and os.path.exists(os.path.join(a.cache, "vae.pt"))
    if cached:
        ck = torch.load(os.path.join(a.cache, "vae.pt"))
        vae.load_state_dict(ck["sd"])
        vae_curve = ck["curve"]
        vae.eval()
    else:
        train_vae(vae, xtr, a.vae_steps, a.vae_batch, a.vae_lr, a.kl_weight,
                  torch.Generator().manual_seed(a.seed + 1), vae_curve)
        if a.cache:
            os.makedirs(a.cache, exist_ok=True)
            torch.save({"sd": vae.state_dict(), "curve": vae_curve}, os.path.join(a.cache, "vae.pt"))
    timings["vae_train"] = time.time() - t
    t = time.time()
    mean, logvar = encode_all(vae, xtr)
    sf = float(1.0 / mean.std().item())
    vae.register_to_config(scaling_factor=sf)
    test_mse = recon_mse(vae, xte[:2000])
    timings["vae_encode"] = time.time() - t
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.3f} M params; reconstruction MSE on 2000 test images "
        f"{test_mse:.5f} (PSNR {10 * math.log10(4 / test_mse):.1f} dB on [-1,1]); latent mean std "
        f"{mean.std().item():.4f} -> scale_factor {sf:.6f}; posterior std mean "
        f"{torch.exp(0.5 * logvar).mean().item():.4f}")

    # --- DiT ---
    t = time.time()
    dit_curve = []
    torch.manual_seed(a.seed + 2)
    model = build_dit()
    ema = copy.deepcopy(model).requires_grad_(False)
    if a.cache and os.path.exists(os.path.join(a.cache, "dit.pt")):
        ck = torch.load(os.path.join(a.cache, "dit.pt"))
        ema.load_state_dict(ck["ema"])
        model.load_state_dict(ck["model"])
        dit_curve = ck["curve"]
    else:
        train_dit(model, ema, mean, torch.exp(0.5 * logvar), ytr_t, sf, a.dit_steps, a.dit_batch, a.dit_lr, a.ema,
                  torch.Generator().manual_seed(a.seed + 3), dit_curve)
        if a.cache:
            torch.save({"ema": ema.state_dict(), "model": model.state_dict(), "curve": dit_curve},
                       os.path.join(a.cache, "dit.pt"))
    timings["dit_train"] = time.time() - t
    log(f"dit: {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params, config {DIT_CONFIG}")

    # --- export ---
    t = time.time()
    dit_path = os.path.join(out_dir, "fashion_mnist_dit.onnx")
    enc_path = os.path.join(out_dir, "fashion_mnist_vae_encoder.onnx")
    dec_path = os.path.join(out_dir, "fashion_mnist_vae_decoder.onnx")
    E.export_vae(vae, enc_path, dec_path, image_size=IMAGE_SIZE, scale_factor=sf,
                 source="mgd3-demo:fashion-mnist-vae", seed=a.seed)
    E.export_dit(ema, dit_path, in_channels=LATENT[0], input_size=LATENT[1], num_classes=NUM_CLASSES,
                 learn_sigma=True, source="mgd3-demo:fashion-mnist-dit", seed=a.seed)
    timings["export"] = time.time() - t
    sizes = {os.path.basename(p): os.path.getsize(p) for p in (dit_path, enc_path, dec_path)}
    log(f"exported: {sizes} ({sum(sizes.values()) / 1e6:.2f} MB in all)")

    # --- samples + plots ---
    t = time.time()
    grid = sample_grid_onnx(dit_path, dec_path, 8, a.seed + 4)
    save_grid(os.path.join(out_dir, "samples.png"), grid)
    timings["sample_grid"] = time.time() - t
    plot_curves(os.path.join(out_dir, "loss_curve.png"), vae_curve, dit_curve,
                len(xtr) / a.vae_batch, len(xtr) / a.dit_batch)

    # --- held-out check: a CNN trained on real images classifies the generated ones ---
    t = time.time()
    net = train_checker(xtr, ytr_t, a.check_steps, torch.Generator().manual_seed(a.seed + 5))
    real_acc, _ = accuracy(net, xte, yte_t)
    gen = to_model(grid.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
    gen_y = torch.arange(NUM_CLASSES).repeat_interleave(grid.shape[1])
    gen_acc, pred = accuracy(net, gen, gen_y)
    per_class = [(pred[gen_y == k] == k).float().mean().item() for k in range(NUM_CLASSES)]
    timings["check"] = time.time() - t
    log(f"check CNN: real test accuracy {real_acc:.4f}; accuracy on the 80 generated samples {gen_acc:.4f}; "
        f"per class {' '.join(f'{CLASSES[k]}={per_class[k]:.2f}' for k in range(NUM_CLASSES))}")

    vc, dc = np.array(vae_curve), np.array(dit_curve)
    summary = {
        "seed": a.seed, "args": vars(a), "vae_config": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in VAE_CONFIG.items()},
        "dit_config": DIT_CONFIG, "scale_factor": sf,
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "dit_params": sum(p.numel() for p in model.parameters()),
        "vae_final_mse_last200": float(vc[-4:, 1].mean()), "vae_final_kl_last200": float(vc[-4:, 2].mean()),
        "vae_test_recon_mse": test_mse,
        "dit_final_mse_last500": float(dc[-10:, 1].mean()), "dit_final_vb_last500": float(dc[-10:, 2].mean()),
        "check_real_test_acc": real_acc, "check_generated_acc": gen_acc, "check_generated_per_class": per_class,
        "onnx_bytes": sizes, "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "total_s": round(time.time() - T0, 1),
    }
    print(json.dumps(summary))
    if a.summary_json:
        with open(a.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f"; total {time.time() - T0:.0f}s")


if __name__ == "__main__":
    main()
