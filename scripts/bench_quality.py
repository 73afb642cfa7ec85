#!/usr/bin/env python3
"""Distil -> train -> test benchmark of the demo Fashion-MNIST models (models/demo/).

    target/release/worker import-fashion-mnist --out data/fashion-mnist
    /work/venv/bin/python scripts/bench_quality.py --quick          # 1 seed, IPC 10, few epochs
    /work/venv/bin/python scripts/bench_quality.py                  # IPC 10 and 50, 3 seeds

For every IPC and seed it builds three training sets of IPC images per class:

  mgd3      the Rust worker's MGD3 samples: mode guidance lambda = 0.1, t_stop = 25
  unguided  the same DiT, noise and CFG without mode guidance (--stop-guidance = --steps = 50)
  real      IPC random real training images per class (numpy default_rng(seed))

and trains the same small CNN (ConvNet-3 style, instance norm, average pooling; random-crop + flip
augmentation) on each from scratch (torch seed = seed), then evaluates it on the Fashion-MNIST test
set.  The synthetic sets come from

  <worker> distill-class --data <data>/train --class <NN_name> --label <k> --ipc N --dit ... \\
      --vae-encoder ... --vae-decoder ... --out <dir> --seed <s> --guidance-scale 0.1 \\
      --stop-guidance 25 --steps 50 --cfg-scale 4 --cfg-channels 4

(one call per class; <dir>/<NN_name>/<j>.png, 32x32 grey).  <dir> is named after every setting that
decides the images plus a digest of the three model files, e.g.
out/bench_quality/mgd3_l0.1_t25_s50_cfg4x4_<digest>/ipc10_seed0, so complete outputs are reused (unless
--force) only for the very same settings and models.

Sensitivity: several --guidance-scale and --t-stop values make a grid of MGD3 sets, each labelled
`mgd3 l=<lambda> t=<t_stop>`; --methods picks the sets to build, e.g.

    bench_quality.py --ipcs 10 --guidance-scale 0.05 0.1 0.2 --t-stop 0 15 25 35 --methods mgd3 unguided

A set the worker refuses because a guided latent ran away (lambda too large for the model; the worker
names the class, sample and step) is reported as diverged, with the worker's message in the JSON, and the
run goes on.

Besides the table, every MGD3 set is compared with the unguided set of the same seed (same classifier
initialisation, same test set): the mean +- std of the per-seed accuracy difference and on how many
seeds MGD3 was better.

It also reports the MGD3 paper's diversity and representativeness, computed here in the VAE's
(scaled) latent space, on the encoder's posterior mean -- the paper measures them in a 2-D t-SNE
embedding; this uses the latent space directly:

  diversity of a synthetic image   = distance to the nearest other image of its class in its set
  representativeness (distance)    = mean distance to its 50 nearest real training images of its
                                     class (a real-set image's own copy is left out)

Both are min-max normalised per comparison (the pooled per-image values of the sets compared at one
IPC and seed), averaged over images and classes, then over seeds.  Higher diversity is better; a
lower representativeness distance is better (the table also shows 1 - normalised distance, higher =
more representative).  Raw (unnormalised) latent distances are in the JSON.

Preprocessing is the worker's (scripts/mgd3ref.py): ADM center_crop_arr to 32x32 with Pillow (a
BICUBIC resize for the 28x28 real images; 32x32 synthetic ones are unchanged), v/255, Normalize(0.5,
0.5); the IDX test set is read with mgd3ref.load_idx_split.  Torch uses --threads CPU threads
(default 1).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import mgd3ref as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = 32
METHODS = ("mgd3", "unguided", "real")
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

def class_folders(train_dir: str):
    names = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not names:
        raise SystemExit(f"no class folders in {train_dir}: run `worker import-fashion-mnist --out DIR` first")
    return names


def image_files(folder: str):
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith((".png", ".jpg", ".jpeg")))


def load_test(a, classes):
    if a.test_source == "idx" or (a.test_source == "auto" and os.path.exists(
            os.path.join(a.idx_dir, "t10k-images-idx3-ubyte.gz"))):
        x, y = R.load_idx_split(a.idx_dir, "test")
        if a.test_limit:
            x, y = x[:a.test_limit], y[:a.test_limit]
        xs = np.stack([R.preprocess_u8(im, IMAGE_SIZE) for im in x])
        return xs, y, f"{a.idx_dir}/t10k (IDX, {len(y)} images)"
    paths, ys = [], []
    for k, c in enumerate(classes):
        files = image_files(os.path.join(a.data, "test", c))
        if a.test_limit:
            files = files[: max(1, a.test_limit // len(classes))]
        paths += files
        ys += [k] * len(files)
    return R.load_images(paths, IMAGE_SIZE), np.array(ys, np.int64), f"{a.data}/test ({len(ys)} images)"


# ---------------------------------------------------------------------------
# synthetic sets from the Rust worker
# ---------------------------------------------------------------------------

def models_tag(a) -> str:
    """Short digest of the three model files, so that outputs of other models are never reused."""
    h = hashlib.sha256()
    for p in (a.dit, a.vae_encoder, a.vae_decoder):
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:10]


def set_specs(a):
    """(label, guidance scale, t_stop, sampler) of every synthetic or real set, in table order.

    The MGD3 label is plain `mgd3` for a single (lambda, t_stop); a grid labels each cell. With
    several --samplers, synthetic labels end with the sampler (`mgd3 ddim`, `unguided ddpm`)."""
    specs = []
    for sampler in a.samplers:
        tag = f" {sampler}" if len(a.samplers) > 1 else ""
        if "mgd3" in a.methods:
            grid = [(g, t) for g in a.guidance_scale for t in a.t_stop]
            for g, t in grid:
                specs.append(("mgd3" + tag if len(grid) == 1 else f"mgd3 l={g:g} t={t}{tag}", g, t, sampler))
        if "unguided" in a.methods:
            specs.append(("unguided" + tag, 0.0, a.steps, sampler))
    if "real" in a.methods:
        specs.append(("real", None, None, None))
    return specs


class Diverged(Exception):
    """The worker refused the set: a sample's guided latent ran away (lambda too large for the model)."""


def distil(a, label: str, guidance: float, stop: int, ipc: int, seed: int, classes, sampler: str = "ddpm") -> str:
    """Runs the worker for every class whose images are missing; returns the set's folder.

    The folder name carries every setting that decides the images (and the models' digest), so a run with
    other settings never picks up stale outputs."""
    kind = "unguided" if label.startswith("unguided") else f"mgd3_l{guidance:g}_t{stop}"
    if sampler != "ddpm":
        kind += f"_{sampler}_eta{a.eta:g}"
    out = os.path.join(a.work_dir, f"{kind}_s{a.steps}_cfg{a.cfg_scale:g}x{a.cfg_channels}_{a.models_tag}",
                       f"ipc{ipc}_seed{seed}")
    for k, c in enumerate(classes):
        have = [os.path.join(out, c, f"{j}.png") for j in range(ipc)]
        if not a.force and all(os.path.exists(p) for p in have):
            continue
        cmd = [a.worker, "distill-class", "--data", os.path.join(a.data, "train"), "--class", c, "--label", str(k),
               "--ipc", str(ipc), "--dit", a.dit, "--vae-encoder", a.vae_encoder, "--vae-decoder", a.vae_decoder,
               "--out", out, "--seed", str(seed), "--guidance-scale", str(guidance),
               "--stop-guidance", str(stop), "--steps", str(a.steps), "--cfg-scale", str(a.cfg_scale),
               "--cfg-channels", str(a.cfg_channels)]
        if sampler != "ddpm":
            cmd += ["--sampler", sampler, "--eta", str(a.eta)]
        if a.latent_cache:
            cmd += ["--latent-cache", a.latent_cache]
        if a.worker_threads:
            cmd += ["--threads", str(a.worker_threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and "diverged at step" in r.stderr:
            raise Diverged(r.stderr.strip().splitlines()[-1].removeprefix("error: "))
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:])
            raise SystemExit(f"worker failed ({r.returncode}): {' '.join(cmd)}")
        if a.verbose:
            print("   ", r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
    return out


def load_set(root: str, ipc: int, classes):
    paths, ys = [], []
    for k, c in enumerate(classes):
        files = [os.path.join(root, c, f"{j}.png") for j in range(ipc)]
        missing = [p for p in files if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"{root}: missing {missing[:3]}")
        paths += files
        ys += [k] * ipc
    return R.load_images(paths, IMAGE_SIZE), np.array(ys, np.int64), paths


def real_subset(a, ipc: int, seed: int, classes):
    rng = np.random.default_rng(seed)
    paths, ys = [], []
    for k, c in enumerate(classes):
        files = image_files(os.path.join(a.data, "train", c))
        if len(files) < ipc:
            raise SystemExit(f"class {c}: {len(files)} real images < IPC {ipc}")
        pick = sorted(rng.choice(len(files), ipc, replace=False).tolist())
        paths += [files[i] for i in pick]
        ys += [k] * ipc
    return R.load_images(paths, IMAGE_SIZE), np.array(ys, np.int64), paths


# ---------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------

class ConvNet(nn.Module):
    """ConvNet-3 of the dataset-distillation literature, narrower: (conv3x3-instancenorm-relu-avgpool) x3."""

    def __init__(self, width=(32, 64, 64), num_classes=10):
        super().__init__()
        layers, cin = [], 1
        for w in width:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.GroupNorm(w, w, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * (IMAGE_SIZE // 8) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation (pad with the background value -1, crop back) and horizontal flip."""
    n = x.shape[0]
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    idx = torch.arange(IMAGE_SIZE)
    rows = (dy[:, None] + idx[None]).view(n, 1, IMAGE_SIZE, 1).expand(n, 1, IMAGE_SIZE, IMAGE_SIZE + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx[:, None] + idx[None]).view(n, 1, 1, IMAGE_SIZE).expand(n, 1, IMAGE_SIZE, IMAGE_SIZE)
    out = torch.gather(xp, 3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train_eval(x: np.ndarray, y: np.ndarray, xt: torch.Tensor, yt: torch.Tensor, seed: int, epochs: int,
               batch: int, lr: float):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ConvNet()
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    n = len(x)
    steps_per_epoch = max(1, -(-n // batch))
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    net.train()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            loss = F.cross_entropy(net(augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xt), 1000):
            correct += (net(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum().item()
    return correct / len(xt), float(loss.item())


# ---------------------------------------------------------------------------
# latent-space diversity / representativeness
# ---------------------------------------------------------------------------

class Encoder:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
        md = self.sess.get_modelmeta().custom_metadata_map
        self.scale = float(md["mgd3.scale_factor"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Scaled posterior means, flattened: [N, C*h*w]."""
        outs = []
        for i in range(0, len(x), 256):
            mean = self.sess.run(["mean"], {"image": np.ascontiguousarray(x[i:i + 256])})[0]
            outs.append(mean.reshape(len(mean), -1) * self.scale)
        return np.concatenate(outs).astype(np.float64)


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d, 0))


def latent_metrics(z: np.ndarray, y: np.ndarray, paths, real_pool, knn: int):
    """Per-image raw diversity and representativeness distance."""
    div = np.zeros(len(z))
    rep = np.zeros(len(z))
    for k in np.unique(y):
        m = np.where(y == k)[0]
        d = pairwise(z[m], z[m])
        np.fill_diagonal(d, np.inf)
        div[m] = d.min(1) if len(m) > 1 else 0.0
        rz, rpaths = real_pool[k]
        dr = pairwise(z[m], rz)
        index = {p: j for j, p in enumerate(rpaths)}
        for r, i in enumerate(m):  # a real image is not its own neighbour
            j = index.get(os.path.abspath(paths[i]))
            if j is not None:
                dr[r, j] = np.inf
        kk = min(knn, dr.shape[1] - 1)
        rep[m] = np.sort(dr, axis=1)[:, :kk].mean(1)
    return div, rep


def minmax(values: dict) -> dict:
    pooled = np.concatenate(list(values.values()))
    lo, hi = pooled.min(), pooled.max()
    span = hi - lo if hi > lo else 1.0
    return {k: (v - lo) / span for k, v in values.items()}


# ---------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=os.path.join(ROOT, "target", "release", "worker"), help="worker binary")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "fashion-mnist"),
                    help="ImageFolder root with train/ and test/ (worker import-fashion-mnist --out DIR)")
    ap.add_argument("--models", default=os.path.join(ROOT, "models", "demo"))
    ap.add_argument("--dit", default=None, help="default: <models>/fashion_mnist_dit.onnx")
    ap.add_argument("--vae-encoder", default=None, help="default: <models>/fashion_mnist_vae_encoder.onnx")
    ap.add_argument("--vae-decoder", default=None, help="default: <models>/fashion_mnist_vae_decoder.onnx")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=200, help="classifier epochs over the IPC*10 images")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--quick", action="store_true", help="1 seed, IPC 10, 60 epochs, 2000 test images")
    ap.add_argument("--guidance-scale", type=float, nargs="+", default=[0.1],
                    help="MGD3 lambda; several values (with --t-stop) make a grid of MGD3 sets")
    ap.add_argument("--t-stop", type=int, nargs="+", default=[25], help="MGD3 t_stop; several values make a grid")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="training sets to build (default: all three)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samplers", nargs="+", choices=("ddpm", "ddim"), default=["ddpm"],
                    help="worker --sampler of the synthetic sets (several: one set of each per sampler)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta (worker --eta)")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--cfg-channels", type=int, default=4)
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "out", "bench_quality"))
    ap.add_argument("--latent-cache", default=None, help="worker --latent-cache (default: <work-dir>/latents)")
    ap.add_argument("--worker-threads", type=int, default=None, help="worker --threads (default: all cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ORT threads of this script")
    ap.add_argument("--force", action="store_true", help="re-run the worker even where outputs exist")
    ap.add_argument("--test-source", choices=("auto", "idx", "folder"), default="auto",
                    help="test set: Debian's t10k IDX files (auto: if present) or <data>/test")
    ap.add_argument("--idx-dir", default=IDX_DIR)
    ap.add_argument("--test-limit", type=int, default=0, help="use only the first N test images (0 = all)")
    ap.add_argument("--real-pool", type=int, default=2000,
                    help="real images per class for representativeness (seeded subset; 0 = all)")
    ap.add_argument("--knn", type=int, default=50)
    ap.add_argument("--json", default=None, help="results JSON (default: <work-dir>/results.json)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.ipcs, a.epochs = a.seeds[:1], [10], min(a.epochs, 60)
        a.test_limit = a.test_limit or 2000
    a.dit = a.dit or os.path.join(a.models, "fashion_mnist_dit.onnx")
    a.vae_encoder = a.vae_encoder or os.path.join(a.models, "fashion_mnist_vae_encoder.onnx")
    a.vae_decoder = a.vae_decoder or os.path.join(a.models, "fashion_mnist_vae_decoder.onnx")
    a.latent_cache = a.latent_cache or os.path.join(a.work_dir, "latents")
    a.json = a.json or os.path.join(a.work_dir, "results.json")
    for p in (a.worker, a.dit, a.vae_encoder, a.vae_decoder):
        if not os.path.exists(p):
            raise SystemExit(f"missing {p}")
    a.models_tag = models_tag(a)
    specs = set_specs(a)
    torch.set_num_threads(a.threads)
    os.makedirs(a.work_dir, exist_ok=True)
    classes = class_folders(os.path.join(a.data, "train"))
    log(f"classes {classes}; IPC {a.ipcs}, seeds {a.seeds}, {a.epochs} epochs; DiT {a.dit}")

    xt, yt, test_desc = load_test(a, classes)
    xt, yt = torch.from_numpy(xt), torch.from_numpy(yt)
    log(f"test set: {test_desc}")

    enc = Encoder(a.vae_encoder, a.threads)
    rng = np.random.default_rng(12345)
    real_pool = {}
    for k, c in enumerate(classes):
        files = image_files(os.path.join(a.data, "train", c))
        if a.real_pool and len(files) > a.real_pool:
            files = [files[i] for i in sorted(rng.choice(len(files), a.real_pool, replace=False))]
        real_pool[k] = (enc(R.load_images(files, IMAGE_SIZE)), [os.path.abspath(p) for p in files])
    log(f"real pool for representativeness: {sum(len(v[1]) for v in real_pool.values())} images encoded")

    runs = []
    for ipc in a.ipcs:
        for seed in a.seeds:
            sets = {}
            for label, guidance, stop, sampler in specs:
                t = time.time()
                if label == "real":
                    sets[label] = real_subset(a, ipc, seed, classes)
                    continue
                try:
                    folder = distil(a, label, guidance, stop, ipc, seed, classes, sampler)
                except Diverged as e:
                    runs.append(dict(ipc=ipc, seed=seed, method=label, acc=None, diverged=str(e)))
                    log(f"IPC {ipc} seed {seed}: {label} diverged, no set: {e}")
                    continue
                sets[label] = load_set(folder, ipc, classes)
                log(f"IPC {ipc} seed {seed}: {label} set ready ({time.time() - t:.0f}s)")
            raw_div, raw_rep = {}, {}
            for method, (x, y, paths) in sets.items():
                raw_div[method], raw_rep[method] = latent_metrics(enc(x), y, paths, real_pool, a.knn)
            ndiv, nrep = minmax(raw_div), minmax(raw_rep)
            for method, (x, y, paths) in sets.items():
                t = time.time()
                acc, last_loss = train_eval(x, y, xt, yt, seed, a.epochs, a.batch, a.lr)
                row = dict(ipc=ipc, seed=seed, method=method, acc=acc, final_train_loss=last_loss,
                           diversity=float(ndiv[method].mean()), repr_distance=float(nrep[method].mean()),
                           raw_diversity=float(raw_div[method].mean()),
                           raw_repr_distance=float(raw_rep[method].mean()), train_s=round(time.time() - t, 1))
                runs.append(row)
                log(f"IPC {ipc:3d} seed {seed} {method:9s} acc {acc * 100:6.2f}%  diversity {row['diversity']:.3f} "
                    f"repr.distance {row['repr_distance']:.3f}  (raw {row['raw_diversity']:.3f} / "
                    f"{row['raw_repr_distance']:.3f}; {row['train_s']:.0f}s)")
            if len(specs) > 1:
                log(f"IPC {ipc} seed {seed} done")

    summary = []
    for ipc in a.ipcs:
        for method, _, _, _ in specs:
            rs = [r for r in runs if r["ipc"] == ipc and r["method"] == method]
            if any(r["acc"] is None for r in rs):
                summary.append(dict(ipc=ipc, method=method, seeds=len(rs), diverged=True,
                                    diverged_seeds=sum(r["acc"] is None for r in rs)))
                continue
            acc = np.array([r["acc"] for r in rs]) * 100
            f = lambda key: float(np.mean([r[key] for r in rs]))  # noqa: E731
            summary.append(dict(ipc=ipc, method=method, seeds=len(rs), acc_mean=float(acc.mean()),
                                acc_std=float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                                diversity=f("diversity"), repr_distance=f("repr_distance"),
                                representativeness=1.0 - f("repr_distance"), raw_diversity=f("raw_diversity"),
                                raw_repr_distance=f("raw_repr_distance")))

    # Same seed = same classifier initialisation and test set, so the per-seed difference is the fair comparison.
    paired = []
    for ipc in a.ipcs:
        base = {r["seed"]: r["acc"] for r in runs if r["ipc"] == ipc and r["method"] == "unguided"}
        for method, _, _, _ in specs:
            if not method.startswith("mgd3") or not base or None in base.values():
                continue
            d = np.array([(r["acc"] - base[r["seed"]]) * 100 for r in runs
                          if r["ipc"] == ipc and r["method"] == method and r["acc"] is not None])
            if len(d) == 0:
                continue
            paired.append(dict(ipc=ipc, method=method, vs="unguided", delta_mean=float(d.mean()),
                               delta_std=float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                               wins=int((d > 0).sum()), seeds=len(d)))

    note = ("diversity = latent distance to the nearest other image of the same class in the set (higher = more "
            "diverse); representativeness distance = mean latent distance to the 50 nearest real images of the "
            "class (lower = more representative; 'repr.' = 1 - normalised distance); both min-max normalised per "
            "comparison (IPC, seed) over the sets compared, then averaged. The MGD3 paper measures them in a "
            "2-D t-SNE space; this uses the VAE latent space (scaled posterior means, 4x8x8) directly.")
    print()
    print(f"Fashion-MNIST, test: {test_desc}; classifier: ConvNet-3 (32/64/64), {a.epochs} epochs, "
          f"seeds {a.seeds}")
    width = max(9, *(len(m) for m, _, _, _ in specs))
    hdr = f"{'IPC':>4} {'method':<{width}} {'accuracy %':>15} {'diversity':>10} {'repr.dist':>10} {'repr.':>7} " \
          f"{'raw div':>8} {'raw rdist':>9}"
    print(hdr)
    print("-" * len(hdr))
    for s in summary:
        if s.get("diverged"):
            print(f"{s['ipc']:>4} {s['method']:<{width}} diverged on {s['diverged_seeds']}/{s['seeds']} seeds: "
                  "the worker refused the set (a guided latent ran away; lambda too large for this model)")
            continue
        print(f"{s['ipc']:>4} {s['method']:<{width}} {s['acc_mean']:>7.2f} ± {s['acc_std']:<5.2f} {s['diversity']:>10.3f} "
              f"{s['repr_distance']:>10.3f} {s['representativeness']:>7.3f} {s['raw_diversity']:>8.3f} "
              f"{s['raw_repr_distance']:>9.3f}")
    if paired:
        print()
        print("accuracy minus unguided, paired by seed (percentage points):")
        for p in paired:
            print(f"{p['ipc']:>4} {p['method']:<{width}} {p['delta_mean']:+7.2f} ± {p['delta_std']:<5.2f} "
                  f"better on {p['wins']}/{p['seeds']} seeds")
    print()
    print("Note:", note)
    result = dict(config={k: v for k, v in vars(a).items()}, test_set=test_desc, note=note, summary=summary,
                  paired=paired, runs=runs, total_s=round(time.time() - T0, 1))
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
