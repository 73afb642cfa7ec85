"""Reference code shared by the scripts in this folder: the MGD3 samplers and their schedules, the
worker's image preprocessing, and the IDX (MNIST / Fashion-MNIST) reader.

Scripts run as `python scripts/<name>.py` import it with `import mgd3ref` (Python puts the script's
folder first on sys.path). Only numpy is imported at load time; onnxruntime, Pillow and torch are
imported inside the functions that use them, so the benchmark venv (.venv-bench, no torch) and the
export venv (/work/venv, with torch) can both load it.

Schedules (float64; MGD3-SPEC.md sec. 4):
  - `linear_betas(T, beta_start, beta_end)`: np.linspace(beta_start, beta_end, T) in float64, the
    training betas; `alphas_cumprod` is cumprod(1 - beta).
  - `DdpmSchedule(T, S, ...)`: ADM's `space_timesteps(T, "S")` respacing (stride (T-1)/(S-1) added
    up in floating point, Python round, deduplicated); the respaced betas
    1 - abar[t_i]/abar[t_(i-1)] and every coefficient the DDPM step gathers (sqrt(1/abar),
    sqrt(1/abar - 1), posterior mean c1/c2, min_log = clipped log posterior variance,
    max_log = log beta). For T = 1000, S = 50: t = 0, 20, 41, ..., 979, 999.
  - `DdimSchedule(T, S, ...)`: ADM's `space_timesteps(T, "ddimS")` (the first integer stride with
    len(range(0, T, stride)) == S; T = 1000, S = 50: t = 0, 20, ..., 980), abar at the kept
    timesteps, eta's sigma and the direction coefficient sqrt(1 - abar_prev - sigma^2).

Samplers (one model call per step on the CFG pair [x, x] with labels [label]*N + [null]*N; CFG on
the first `cfg_channels` epsilon channels; mode guidance while the respaced index i > t_stop):
  - `ddpm_sample`: numpy + onnxruntime, all step arithmetic float32 with float64 coefficients cast
    to float32; learned variance sigma = exp(0.5*(f*max_log + (1-f)*min_log)), f = (v+1)/2;
    guided mean mu + ((-(x0 - m))*lambda)*sigma. Produces tests/fixtures/parity through
    scripts/parity_reference.py; also used by guidance_trace.py and train_demo_models.py.
  - `ddim_sample`: numpy + onnxruntime, paper Algorithm 1: eps_hat = eps - ((m - x0)*lambda)*
    sqrt(1 - abar), used for both x0' and the direction term. Produces tests/fixtures/parity_ddim
    through scripts/parity_reference_ddim.py.
  - `ddpm_sample_torch`: the DDPM step on torch tensors with a torch DiT (python-float
    coefficients): gpu_torch_baseline.py's throughput loop and make_test_models.py's sanity check.

Preprocessing (the worker's, worker/src/data.rs; fixtures in tests/fixtures/pillow):
  - `center_crop_arr`: ADM's: BOX halving while the short side is >= 2*size, BICUBIC resize of the
    short side to `size` (sizes with Python's round, half to even), centred square cut through a
    numpy array.
  - `normalize_u8` / `to_tensor_normalize`: torchvision ToTensor + Normalize(0.5, 0.5) in float32
    (v/255, -0.5, /0.5), CHW; `preprocess_image` (PIL image), `preprocess_u8` (uint8 array) and
    `load_images` (files) chain them.

IDX: `read_idx` (gzip'd IDX, unsigned-byte data) and `load_idx_split` (train-* / t10k-* files, as in
Debian's dataset-fashion-mnist under /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

# ---------------------------------------------------------------------------
# schedules (float64)
# ---------------------------------------------------------------------------


def linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The training betas of a linear schedule: float64 [T]."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s), float64."""
    return np.cumprod(1.0 - betas)


def respaced_timesteps(T: int, S: int) -> list:
    """space_timesteps(T, "S") with one section: k*stride accumulated by repeated float addition."""
    if S > T:
        raise ValueError("more steps than timesteps")
    stride = 1.0 if S <= 1 else (T - 1) / (S - 1)
    kept, cur = [], 0.0
    for _ in range(S):
        kept.append(round(cur))  # Python round (half to even)
        cur += stride
    return sorted(set(kept))


class DdpmSchedule:
    """Respaced DDPM schedule: timestep_map[i] is the original timestep of respaced index i."""

    def __init__(self, T: int, S: int, beta_start: float, beta_end: float):
        base_abar = alphas_cumprod(linear_betas(T, beta_start, beta_end))
        self.timestep_map = respaced_timesteps(T, S)
        betas, last = [], 1.0
        for t in self.timestep_map:
            betas.append(1.0 - base_abar[t] / last)
            last = base_abar[t]
        b = np.array(betas, dtype=np.float64)
        self.betas = b
        alphas = 1.0 - b
        self.abar = np.cumprod(alphas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.sqrt_recip_abar = np.sqrt(1.0 / self.abar)
        self.sqrt_recipm1_abar = np.sqrt(1.0 / self.abar - 1.0)
        self.post_var = b * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.min_log = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.max_log = np.log(b)
        self.c1 = b * np.sqrt(self.abar_prev) / (1.0 - self.abar)
        self.c2 = (1.0 - self.abar_prev) * np.sqrt(alphas) / (1.0 - self.abar)
        self.S = len(b)

    def f32(self, name: str, i: int) -> np.float32:
        return np.float32(getattr(self, name)[i])

    def rows(self):
        for i in range(self.S):
            yield (i, self.timestep_map[i], f"{self.betas[i]:.8e}", f"{self.abar[i]:.8e}", f"{self.min_log[i]:.6f}",
                   f"{self.max_log[i]:.6f}", f"{self.sqrt_recip_abar[i]:.6f}", f"{self.sqrt_recipm1_abar[i]:.6f}")

    def print_table(self):
        print(f"{'i':>3} {'t':>4} {'beta':>15} {'abar':>15} {'min_log':>10} {'max_log':>10} "
              f"{'sqrt(1/ab)':>11} {'sqrt(1/ab-1)':>12}")
        for r in self.rows():
            print(f"{r[0]:>3} {r[1]:>4} {r[2]:>15} {r[3]:>15} {r[4]:>10} {r[5]:>10} {r[6]:>11} {r[7]:>12}")


def ddim_timesteps(T: int, S: int) -> list:
    """ADM space_timesteps(T, "ddimS"): the first integer stride with len(range(0, T, stride)) == S."""
    for stride in range(1, T):
        if len(range(0, T, stride)) == S:
            return list(range(0, T, stride))
    raise ValueError(f"cannot create exactly {S} steps with an integer stride from T={T}")


class DdimSchedule:
    """DDIM schedule: abar at the kept timesteps of the training schedule (no recomputed betas)."""

    def __init__(self, T: int, S: int, beta_start: float, beta_end: float):
        train_abar = alphas_cumprod(linear_betas(T, beta_start, beta_end))
        self.T = T
        self.timesteps = ddim_timesteps(T, S)
        self.S = len(self.timesteps)
        assert self.S == S
        self.abar = train_abar[np.array(self.timesteps)]
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.sqrt_recip_abar = np.sqrt(1.0 / self.abar)
        self.sqrt_recipm1_abar = np.sqrt(1.0 / self.abar - 1.0)
        self.sqrt_one_minus_abar = np.sqrt(1.0 - self.abar)
        self.sqrt_abar_prev = np.sqrt(self.abar_prev)
        # ADM-style recomputation, for the README/consistency check only:
        # beta'_i = 1 - abar_{t_i}/abar_{t_{i-1}}, abar' = cumprod(1 - beta')
        last, b = 1.0, []
        for t in self.timesteps:
            b.append(1.0 - train_abar[t] / last)
            last = train_abar[t]
        self.adm_abar = np.cumprod(1.0 - np.array(b, dtype=np.float64))

    def sigma(self, eta: float) -> np.ndarray:
        a, ap = self.abar, self.abar_prev
        return eta * np.sqrt((1.0 - ap) / (1.0 - a)) * np.sqrt(1.0 - a / ap)

    def dir_coef(self, eta: float) -> np.ndarray:
        v = 1.0 - self.abar_prev - self.sigma(eta) ** 2
        assert np.all(v >= -1e-15), v
        return np.sqrt(np.maximum(v, 0.0))

    def print_table(self):
        s1 = self.sigma(1.0)
        print(f"{'i':>3} {'t':>4} {'abar':>15} {'abar_prev':>15} {'sqrt(1/ab)':>11} {'sqrt(1/ab-1)':>12} "
              f"{'sqrt(1-ab)':>10} {'sigma(eta=1)':>13} {'dir(eta=1)':>10}")
        d1 = self.dir_coef(1.0)
        for i in range(self.S):
            print(f"{i:>3} {self.timesteps[i]:>4} {self.abar[i]:>15.8e} {self.abar_prev[i]:>15.8e} "
                  f"{self.sqrt_recip_abar[i]:>11.6f} {self.sqrt_recipm1_abar[i]:>12.6f} "
                  f"{self.sqrt_one_minus_abar[i]:>10.6f} {s1[i]:>13.6e} {d1[i]:>10.6f}")


# ---------------------------------------------------------------------------
# ONNX Runtime plumbing and outputs
# ---------------------------------------------------------------------------


def ort_session(path: str, threads: int = 1):
    """CPU InferenceSession with `threads` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def model_meta(sess) -> dict:
    """The model's custom metadata (the mgd3.* keys)."""
    return dict(sess.get_modelmeta().custom_metadata_map)


def run_dit(sess, x: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One DiT call; x is cast to the model's input type (float16 or float32), the output to float32."""
    xin = sess.get_inputs()[0]
    dt = np.float16 if xin.type == "tensor(float16)" else np.float32
    return sess.run(["out"], {"x": x.astype(dt), "t": t, "y": y})[0].astype(np.float32)


def to_uint8_hwc(img: np.ndarray) -> np.ndarray:
    """torchvision save_image(normalize=True, value_range=(-1, 1)) pixel maths, float32."""
    v = (np.clip(img.astype(np.float32), np.float32(-1), np.float32(1)) + np.float32(1)) / np.float32(2)
    u = np.floor(np.clip(v * np.float32(255) + np.float32(0.5), np.float32(0), np.float32(255)))
    return np.ascontiguousarray(u.astype(np.uint8).transpose(0, 2, 3, 1))


def save_npy(path, arr):
    """np.save of a C-contiguous, little-endian copy."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    np.save(path, arr)


# ---------------------------------------------------------------------------
# samplers
# ---------------------------------------------------------------------------


def ddpm_sample(sess, sch: DdpmSchedule, num_classes: int, modes: np.ndarray, noise: np.ndarray, label: int,
                t_stop: int, lam: float, cfg_scale: float, cfg_channels: int, trace=None) -> np.ndarray:
    """MGD3 DDPM sampler (numpy, float32 steps). Returns the trajectory [N, S+1, C, h, w]:
    [:, 0] = x_T = noise[:, 0], [:, k] = x after the k-th step (respaced i = S-k; noise[:, k] is its xi).

    trace(i, x, x0, g, sigma), if given, sees every step's input latent, predicted x0, guidance term
    (None when inactive) and sigma."""
    n, s1 = noise.shape[:2]
    S = s1 - 1
    assert S == sch.S
    C = modes.shape[1]
    lam32, s32 = np.float32(lam), np.float32(cfg_scale)
    one, two, half = np.float32(1.0), np.float32(2.0), np.float32(0.5)
    x = noise[:, 0].astype(np.float32).copy()
    traj = [x.copy()]
    y = np.array([label] * n + [num_classes] * n, dtype=np.int64)
    for k in range(1, S + 1):
        i = S - k
        t = np.full(2 * n, sch.timestep_map[i], dtype=np.int64)
        out = run_dit(sess, np.concatenate([x, x], axis=0), t, y)
        cond, unc = out[:n], out[n:]
        assert out.shape[1] == 2 * C, "the DDPM sampler needs a learn_sigma DiT"
        eps = cond[:, :C].copy()
        kc = cfg_channels
        eps[:, :kc] = unc[:, :kc] + s32 * (cond[:, :kc] - unc[:, :kc])
        v = cond[:, C:]
        frac = (v + one) / two
        logvar = frac * sch.f32("max_log", i) + (one - frac) * sch.f32("min_log", i)
        sigma = np.exp(half * logvar)
        x0 = sch.f32("sqrt_recip_abar", i) * x - sch.f32("sqrt_recipm1_abar", i) * eps
        mu = sch.f32("c1", i) * x0 + sch.f32("c2", i) * x
        g = ((-(x0 - modes)) * lam32) * sigma if i > t_stop else None
        if trace is not None:
            trace(i, x, x0, g, sigma)
        xn = mu + g if g is not None else mu
        if i > 0:
            xn = xn + sigma * noise[:, k]
        x = xn.astype(np.float32)
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), f"non-finite latent at step {k}"
        traj.append(x.copy())
    return np.stack(traj, axis=1)


def ddim_sample(sess, sch: DdimSchedule, num_classes: int, modes: np.ndarray, noise: np.ndarray, label: int,
                t_stop: int, lam: float, cfg_scale: float, cfg_channels: int, eta: float, trace=None) -> np.ndarray:
    """MGD3 DDIM sampler (paper Algorithm 1; numpy, float32 steps). Returns the trajectory
    [N, S+1, C, h, w]: [:, 0] = x_T, [:, k] = x after the k-th step (i = S-k).

    trace(i, k, x, eps, x0, eps_hat, x0p, x_next), if given, sees every step's float32 intermediates."""
    n, s1 = noise.shape[:2]
    S = s1 - 1
    assert S == sch.S
    C = modes.shape[1]
    lam32, s32 = np.float32(lam), np.float32(cfg_scale)
    sigma64 = sch.sigma(eta)
    dir64 = sch.dir_coef(eta)
    x = noise[:, 0].astype(np.float32).copy()
    traj = [x.copy()]
    y = np.array([label] * n + [num_classes] * n, dtype=np.int64)
    for k in range(1, S + 1):
        i = S - k
        t = np.full(2 * n, sch.timesteps[i], dtype=np.int64)
        out = run_dit(sess, np.concatenate([x, x], axis=0), t, y)
        assert out.dtype == np.float32 and out.shape[1] in (C, 2 * C)
        cond, unc = out[:n, :C], out[n:, :C]
        eps = cond.copy()
        kc = cfg_channels
        eps[:, :kc] = unc[:, :kc] + s32 * (cond[:, :kc] - unc[:, :kc])
        ra, rm1 = np.float32(sch.sqrt_recip_abar[i]), np.float32(sch.sqrt_recipm1_abar[i])
        x0 = ra * x - rm1 * eps
        if i > t_stop:
            eps_hat = eps - ((modes - x0) * lam32) * np.float32(sch.sqrt_one_minus_abar[i])
        else:
            eps_hat = eps
        x0p = ra * x - rm1 * eps_hat
        xn = np.float32(sch.sqrt_abar_prev[i]) * x0p + np.float32(dir64[i]) * eps_hat
        if i > 0:
            xn = xn + np.float32(sigma64[i]) * noise[:, k]
        assert xn.dtype == np.float32 and np.all(np.isfinite(xn)), f"non-finite latent at step {k}"
        if trace is not None:
            trace(i, k, x, eps, x0, eps_hat, x0p, xn)
        x = xn
        traj.append(x.copy())
    return np.stack(traj, axis=1)


def ddpm_sample_torch(model, sch: DdpmSchedule, x, modes, label: int, null_class: int, t_stop: int, lam: float,
                      cfg_scale: float, noise, cfg_channels: int = 3, dtype=None, on_step=None):
    """The MGD3 DDPM step on torch tensors: x = x_T [N, C, h, w] (float32, on the model's device),
    modes like x; noise(x) returns the xi of a step (called once per step with i > 0, after the model
    call). The model gets torch.cat([x, x]) (cast to `dtype` if given), t int64, y int64 and returns
    [2N, 2C, h, w] (learn_sigma). Coefficients are Python floats of the float64 schedule;
    on_step(i, x), if given, sees the latent after every step. Returns x_0. Call under torch.no_grad()."""
    import torch

    n, C = x.shape[:2]
    dev = x.device
    k = cfg_channels
    y = torch.cat([torch.full((n,), label, device=dev), torch.full((n,), null_class, device=dev)])
    for i in reversed(range(sch.S)):
        t = torch.full((2 * n,), sch.timestep_map[i], device=dev)
        xin = torch.cat([x, x])
        out = model(xin if dtype is None else xin.to(dtype), t, y).float()
        c, u = out[:n], out[n:]
        eps = torch.cat([u[:, :k] + cfg_scale * (c[:, :k] - u[:, :k]), c[:, k:C]], 1)
        f = (c[:, C:] + 1) / 2
        logvar = f * float(sch.max_log[i]) + (1 - f) * float(sch.min_log[i])
        sigma = torch.exp(0.5 * logvar)
        x0 = float(sch.sqrt_recip_abar[i]) * x - float(sch.sqrt_recipm1_abar[i]) * eps
        mu = float(sch.c1[i]) * x0 + float(sch.c2[i]) * x
        if i > t_stop:
            mu = mu - (x0 - modes) * lam * sigma
        x = mu + (sigma * noise(x) if i > 0 else 0)
        if on_step is not None:
            on_step(i, x)
    return x


# ---------------------------------------------------------------------------
# preprocessing (the worker's: ADM center_crop_arr, ToTensor, Normalize(0.5, 0.5))
# ---------------------------------------------------------------------------


def center_crop_arr(pil_image, image_size: int):
    """ADM's `center_crop_arr` (as DiT's train.py uses it): halve with BOX while the short side is
    at least twice `image_size`, BICUBIC-resize so that the short side is `image_size` (sizes
    rounded with Python's round), then cut the centred square through a numpy array."""
    from PIL import Image

    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize((pil_image.width // 2, pil_image.height // 2), resample=Image.BOX)
    scale = image_size / min(pil_image.size)
    new_size = (round(pil_image.width * scale), round(pil_image.height * scale))
    pil_image = pil_image.resize(new_size, resample=Image.BICUBIC)
    pixels = np.array(pil_image)
    top = (pixels.shape[0] - image_size) // 2
    left = (pixels.shape[1] - image_size) // 2
    return Image.fromarray(pixels[top:top + image_size, left:left + image_size])


def normalize_u8(pixels: np.ndarray) -> np.ndarray:
    """ToTensor's /255 then Normalize(mean=0.5, std=0.5), float32, elementwise (any shape)."""
    v = pixels.astype(np.float32)
    v /= np.float32(255)
    v -= np.float32(0.5)
    v /= np.float32(0.5)
    return v


def to_tensor_normalize(pil_image) -> np.ndarray:
    """ToTensor + Normalize(0.5, 0.5) as torchvision computes it: float32 [C, H, W] in [-1, 1]
    (C = 1 for a grey image)."""
    pixels = np.asarray(pil_image)
    return normalize_u8(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


def preprocess_image(pil_image, image_size: int) -> np.ndarray:
    """The worker's preprocessing of a decoded image: float32 [C, S, S]."""
    return to_tensor_normalize(center_crop_arr(pil_image, image_size))


def preprocess_u8(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """The same for a uint8 array, [H, W] (grey) or [H, W, 3] (RGB): float32 [C, S, S]."""
    from PIL import Image

    return preprocess_image(Image.fromarray(pixels), image_size)


def load_images(paths, image_size: int, mode: str = "L") -> np.ndarray:
    """Decode, convert to `mode` ("L" or "RGB") and preprocess: float32 [N, C, S, S]."""
    from PIL import Image

    out = np.empty((len(paths), 1 if mode == "L" else 3, image_size, image_size), np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = preprocess_image(im.convert(mode), image_size)
    return out


# ---------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)
# ---------------------------------------------------------------------------


def read_idx(path: str) -> np.ndarray:
    """A gzip'd IDX file of unsigned bytes (type code 0x08) as uint8 with the file's dimensions."""
    with gzip.open(path, "rb") as f:
        b = f.read()
    magic = int.from_bytes(b[0:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(b[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_idx_split(data_dir: str, split: str):
    """(images uint8 [N, H, W], labels int64 [N]) of `split` ("train" or "test", the t10k-* files)."""
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
    return x, y
