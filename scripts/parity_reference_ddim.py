#!/usr/bin/env python3
"""Independent numpy + onnxruntime reference of the MGD3 DDIM sampler with mode guidance
(paper Algorithm 1; MGD3-SPEC.md sec. 2.1, 2.2 "DDIM", sec. 4 schedule).

    .venv-bench/bin/python scripts/parity_reference_ddim.py [--root .] [--table-only] [--no-checks]

Uses only numpy, json and onnxruntime. The schedule and the step below (DdimSchedule, ddim_sample in
scripts/mgd3ref.py) are written from the paper's Algorithm 1 alone; with the DDPM reference they share
only the linear training betas, the ORT session / metadata / model call, the uint8 conversion and the
.npy writer.

It writes tests/fixtures/parity_ddim/<case>/ for tests/fixtures/models/tiny_dit.onnx
(+ tiny_vae_decoder.onnx): S=50, N=3, label 3, lambda 0.1, CFG 4.0, eta in {0, 1} x
t_stop in {50, 25, 0} x cfg_channels in {3, 4}, directories `eta<eta>_tstop<t_stop>_ch<k>`.

Schedule (float64): respacing "ddim<S>" as in ADM's space_timesteps: the first stride in 1..T-1 with
len(range(0, T, stride)) == S, kept = range(0, T, stride) (T=1000, S=50: t = 0, 20, ..., 980).
abar_i = training alpha_bar at kept[i] (betas = linspace(beta_start, beta_end, T), abar = cumprod(1-beta)),
abar_prev_i = abar_{i-1}, abar_prev_0 = 1.

Sampler, per respaced step i = S-1 .. 0 (all step arithmetic float32, coefficients computed in float64
and cast to float32 when gathered):
  one ORT call on batch 2N = [x_1..x_N, x_1..x_N], t = [kept[i]]*2N (int64, original scale),
  y = [label]*N + [num_classes]*N; O_c = out[:N], O_u = out[N:] (the variance channels O[:, C:] are unused)
  eps[:, :k] = u + s*(c - u) on the first k = cfg_channels channels, eps[:, k:C] = c
  x0    = sqrt(1/abar_i)*x - sqrt(1/abar_i - 1)*eps
  epsh  = eps - ((m - x0)*lambda)*sqrt(1 - abar_i)          if i > t_stop, else eps
  x0'   = sqrt(1/abar_i)*x - sqrt(1/abar_i - 1)*epsh        (no clipping)
  sigma = eta*sqrt((1-abar_prev)/(1-abar_i))*sqrt(1-abar_i/abar_prev)        (float64 scalar)
  x <- (sqrt(abar_prev)*x0' + sqrt(1-abar_prev-sigma^2)*epsh) + sigma*xi     (noise term only if i > 0)
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from mgd3ref import DdimSchedule, ddim_sample, model_meta, ort_session, run_dit, save_npy, to_uint8_hwc

CASES_ETA = (0.0, 1.0)
CASES_T_STOP = (50, 25, 0)
CASES_CFG_CHANNELS = (3, 4)
LABEL = 3
STEPS = 50
NUM_SAMPLES = 3
GUIDANCE = 0.1
CFG_SCALE = 4.0
SEED = 20240607  # one seed, shared by every case (same modes and noise in all 12 cases)


# ---------------------------------------------------------------------------
# schedule check (float64)
# ---------------------------------------------------------------------------

def check_schedule(sch: DdimSchedule):
    if sch.T == 1000 and sch.S == 50:
        assert sch.timesteps == list(range(0, 1000, 20)), sch.timesteps
    # training abar at the kept timesteps vs ADM's recomputed cumprod(1 - beta'): same to float64
    # rounding; check that none of the float32 coefficients gathered by the sampler changes.
    rel = np.max(np.abs(sch.adm_abar / sch.abar - 1.0))
    f32_diff = 0
    for arr, fn in ((sch.abar, lambda a: np.sqrt(1.0 / a)), (sch.abar, lambda a: np.sqrt(1.0 / a - 1.0)),
                    (sch.abar, lambda a: np.sqrt(1.0 - a))):
        f32_diff += int(np.sum(fn(arr).astype(np.float32) != fn(sch.adm_abar).astype(np.float32)))
    adm_prev = np.append(1.0, sch.adm_abar[:-1])
    for eta in CASES_ETA:
        s_adm = eta * np.sqrt((1 - adm_prev) / (1 - sch.adm_abar)) * np.sqrt(1 - sch.adm_abar / adm_prev)
        f32_diff += int(np.sum(sch.sigma(eta).astype(np.float32) != s_adm.astype(np.float32)))
        d_adm = np.sqrt(np.maximum(1 - adm_prev - s_adm ** 2, 0))
        f32_diff += int(np.sum(sch.dir_coef(eta).astype(np.float32) != d_adm.astype(np.float32)))
    f32_diff += int(np.sum(np.sqrt(sch.abar_prev).astype(np.float32) != np.sqrt(adm_prev).astype(np.float32)))
    print(f"[schedule] ddim{sch.S}: t = {sch.timesteps[0]}, {sch.timesteps[1]}, ..., {sch.timesteps[-1]}; "
          f"max rel |abar_train - abar_ADM| = {rel:.2e}; float32 coefficients that differ: {f32_diff}")
    return rel, f32_diff


# ---------------------------------------------------------------------------
# self-checks
# ---------------------------------------------------------------------------

def check_closed_form(dit, sch, num_classes, modes, noise, ch):
    """t_stop = S, eta = 0: every step must equal the textbook deterministic DDIM update
    x_prev = sqrt(abar_prev)*(x - sqrt(1-abar)*eps)/sqrt(abar) + sqrt(1-abar_prev)*eps,
    evaluated in float64 from the same float32 x and eps, up to float32 rounding."""
    worst = [0.0, 0.0]  # max abs error, max error in units of float32 eps * (term magnitude)

    def tr(i, k, x, eps, x0, eps_hat, x0p, xn):
        assert eps_hat is eps
        a, ap = sch.abar[i], sch.abar_prev[i]
        xd, ed = x.astype(np.float64), eps.astype(np.float64)
        cf = np.sqrt(ap) * (xd - np.sqrt(1 - a) * ed) / np.sqrt(a) + np.sqrt(1 - ap) * ed
        err = np.abs(xn.astype(np.float64) - cf)
        # scale of the float32 terms that get rounded: |x|/sqrt(a), |eps|*sqrt(1/a-1) (then * sqrt(ap)),
        # and the direction term
        scale = (np.sqrt(ap) * (np.abs(xd) * np.sqrt(1 / a) + np.abs(ed) * np.sqrt(1 / a - 1))
                 + np.sqrt(1 - ap) * np.abs(ed) + np.abs(cf))
        rel = err / (scale * np.finfo(np.float32).eps)
        worst[0] = max(worst[0], float(err.max()))
        worst[1] = max(worst[1], float(rel.max()))

    ddim_sample(dit, sch, num_classes, modes, noise, LABEL, sch.S, GUIDANCE, CFG_SCALE, ch, 0.0, trace=tr)
    print(f"[check] eta=0 tstop={sch.S} ch{ch}: DDIM step vs closed form over 50 steps: max abs err "
          f"{worst[0]:.3e}, max err / (f32 eps * term scale) = {worst[1]:.2f}")
    assert worst[1] < 4.0, worst
    return worst


def check_step_f64(dit, sch, num_classes, modes, traj, noise, t_stop, ch, eta, free_running=False):
    """Recompute the trajectory with the step in float64 (model calls still float32) and return the max
    abs difference to the stored states. Teacher-forced (default): every step starts from the stored
    input; free_running: the float64 state is carried through all S steps."""
    n = modes.shape[0]
    C = modes.shape[1]
    y = np.array([LABEL] * n + [num_classes] * n, dtype=np.int64)
    sig, dc = sch.sigma(eta), sch.dir_coef(eta)
    worst = 0.0
    xf = noise[:, 0].astype(np.float64)
    for k in range(1, sch.S + 1):
        i = sch.S - k
        x = xf.astype(np.float32) if free_running else traj[:, k - 1]
        out = run_dit(dit, np.concatenate([x, x]), np.full(2 * n, sch.timesteps[i], np.int64), y).astype(np.float64)
        c, u = out[:n, :C], out[n:, :C]
        e = c.copy()
        e[:, :ch] = u[:, :ch] + CFG_SCALE * (c[:, :ch] - u[:, :ch])
        xd = xf if free_running else x.astype(np.float64)
        x0 = (xd - np.sqrt(1 - sch.abar[i]) * e) / np.sqrt(sch.abar[i])
        if i > t_stop:
            e = e - np.sqrt(1 - sch.abar[i]) * GUIDANCE * (modes.astype(np.float64) - x0)
        x0 = (xd - np.sqrt(1 - sch.abar[i]) * e) / np.sqrt(sch.abar[i])
        xn = np.sqrt(sch.abar_prev[i]) * x0 + dc[i] * e + (sig[i] * noise[:, k] if i > 0 else 0.0)
        worst = max(worst, float(np.abs(xn - traj[:, k]).max()))
        xf = xn
    return worst


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def eta_name(eta: float) -> str:
    return f"{eta:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--table-only", action="store_true", help="print the schedule, write nothing")
    a = ap.parse_args()

    mdir = os.path.join(a.root, "tests", "fixtures", "models")
    dit = ort_session(os.path.join(mdir, "tiny_dit.onnx"))
    md = model_meta(dit)
    assert md["mgd3.kind"] == "dit" and md["mgd3.learn_sigma"] == "true" and md["mgd3.beta_schedule"] == "linear"
    T = int(md["mgd3.train_timesteps"])
    sch = DdimSchedule(T, STEPS, float(md["mgd3.beta_start"]), float(md["mgd3.beta_end"]))
    num_classes = int(md["mgd3.num_classes"])
    print(f"[schedule] from tiny_dit.onnx metadata: T={T} beta {md['mgd3.beta_start']}..{md['mgd3.beta_end']}, "
          f"S={STEPS} (ddim{STEPS}); null class {num_classes}")
    sch_rel, sch_f32diff = check_schedule(sch)
    sch.print_table()
    if a.table_only:
        return

    dec = ort_session(os.path.join(mdir, "tiny_vae_decoder.onnx"))
    dmd = model_meta(dec)
    assert dmd["mgd3.kind"] == "vae_decoder"
    scale = np.float32(float(dmd["mgd3.scale_factor"]))
    shape = tuple(dit.get_inputs()[0].shape[1:])  # (C, h, w), static

    rng = np.random.default_rng(SEED)
    modes = rng.standard_normal((NUM_SAMPLES, *shape)).astype(np.float32)
    noise = rng.standard_normal((NUM_SAMPLES, STEPS + 1, *shape)).astype(np.float32)

    cf = [check_closed_form(dit, sch, num_classes, modes, noise, ch) for ch in CASES_CFG_CHANNELS]

    pdir = os.path.join(a.root, "tests", "fixtures", "parity_ddim")
    os.makedirs(pdir, exist_ok=True)
    summary, msd = [], {}
    for eta in CASES_ETA:
        for t_stop in CASES_T_STOP:
            for ch in CASES_CFG_CHANNELS:
                name = f"eta{eta_name(eta)}_tstop{t_stop}_ch{ch}"
                traj = ddim_sample(dit, sch, num_classes, modes, noise, LABEL, t_stop, GUIDANCE, CFG_SCALE, ch, eta)
                lat = np.ascontiguousarray(traj[:, STEPS])
                decoded = dec.run(["image"], {"latent": lat / scale})[0].astype(np.float32)
                img = to_uint8_hwc(decoded)
                f64err = check_step_f64(dit, sch, num_classes, modes, traj, noise, t_stop, ch, eta)
                f64free = check_step_f64(dit, sch, num_classes, modes, traj, noise, t_stop, ch, eta, True)
                cdir = os.path.join(pdir, name)
                os.makedirs(cdir, exist_ok=True)
                params = {"label": LABEL, "steps": STEPS, "t_stop": t_stop, "guidance_scale": GUIDANCE,
                          "cfg_scale": CFG_SCALE, "cfg_channels": ch, "num_samples": NUM_SAMPLES,
                          "sampler": "ddim", "eta": eta}
                with open(os.path.join(cdir, "params.json"), "w") as f:
                    json.dump(params, f)
                    f.write("\n")
                save_npy(os.path.join(cdir, "modes.npy"), modes)
                save_npy(os.path.join(cdir, "noise.npy"), noise)
                save_npy(os.path.join(cdir, "trajectory.npy"), traj)
                save_npy(os.path.join(cdir, "latents.npy"), lat)
                save_npy(os.path.join(cdir, "decoded.npy"), decoded)
                save_npy(os.path.join(cdir, "images.npy"), img)
                d2 = float(np.mean((lat.astype(np.float64) - modes) ** 2))
                msd[(eta, t_stop, ch)] = d2
                line = (f"`{name}`: max abs(latent) {np.abs(lat).max():.3f}, max abs(x_k) over trajectory "
                        f"{np.abs(traj).max():.3f}, max abs(decoded) {np.abs(decoded).max():.3f}; latents mean "
                        f"{lat.mean():+.3f} std {lat.std():.3f}; mean sq. dist. to mode {d2:.4f}; image mean "
                        f"{img.mean():.1f}; float64 step vs fixture: teacher-forced max abs err {f64err:.2e}, "
                        f"free-running {f64free:.2e}")
                print("[case]", line)
                summary.append(line)
    print("[modes] mean squared distance latent - mode (guided should be smaller than t_stop=50):")
    mode_lines = []
    for eta in CASES_ETA:
        for ch in CASES_CFG_CHANNELS:
            row = {ts: msd[(eta, ts, ch)] for ts in CASES_T_STOP}
            s = (f"eta={eta_name(eta)} ch{ch}: t_stop 50 (none) {row[50]:.4f}, t_stop 25 {row[25]:.4f}, "
                 f"t_stop 0 {row[0]:.4f}")
            print("  " + s)
            mode_lines.append(s)
            assert row[25] < row[50] and row[0] < row[25], row
    write_readme(pdir, sch, summary, mode_lines, cf, sch_rel, sch_f32diff)


def write_readme(pdir, sch, summary, mode_lines, cf, sch_rel, sch_f32diff):
    s1 = sch.sigma(1.0)
    d1 = sch.dir_coef(1.0)
    rows = "\n".join(
        f"| {i} | {sch.timesteps[i]} | {sch.abar[i]:.8e} | {sch.abar_prev[i]:.8e} | {sch.sqrt_recip_abar[i]:.6f} "
        f"| {sch.sqrt_recipm1_abar[i]:.6f} | {sch.sqrt_one_minus_abar[i]:.6f} | {s1[i]:.6e} | {d1[i]:.6f} |"
        for i in range(sch.S))
    ts = ", ".join(str(t) for t in sch.timesteps)
    text = f"""# MGD3 DDIM sampler parity fixtures (paper Algorithm 1)

Generated by `scripts/parity_reference_ddim.py` (numpy + onnxruntime 1.31.1 on the CPU, one thread)
from `tests/fixtures/models/tiny_dit.onnx` and `tiny_vae_decoder.onnx`:

    .venv-bench/bin/python scripts/parity_reference_ddim.py

The schedule and the step (`DdimSchedule`, `ddim_sample` in `scripts/mgd3ref.py`) were written from
the paper's Algorithm 1 ("DDIM with mode guidance", MGD3-SPEC.md sec. 2.1 / 2.2 "DDIM") and the
schedule of sec. 4, independently of the Rust code. With the DDPM reference they share only the
linear training betas, the ORT session / metadata / model-call helpers, the uint8 pixel conversion
and the .npy writer (nothing of the DDPM step or respaced schedule).

## Schedule (float64)

- Training betas: `np.linspace(beta_start, beta_end, T)` from the DiT metadata (linear, 1e-4..0.02,
  T = 1000), `abar = cumprod(1 - beta)`.
- Respacing `ddim{sch.S}` as ADM's `space_timesteps(T, "ddim{sch.S}")`: the first integer stride in
  1..T-1 with `len(range(0, T, stride)) == S`; kept timesteps `range(0, T, stride)`. For T = 1000,
  S = 50: stride 20, **t = {{{ts}}}** (this is *not* the DDPM-50 set 0, 20, 41, ..., 999 of
  `tests/fixtures/parity`).
- Respaced index i = 0..S-1 ascending, t_i = kept[i]; abar_i = training abar at t_i;
  abar_prev_i = abar_(i-1), abar_prev_0 = 1.
  (ADM instead recomputes beta'_i = 1 - abar(t_i)/abar(t_(i-1)) and abar' = cumprod(1 - beta'); that
  agrees with the training abar to max relative {sch_rel:.1e}, and none of the float32 coefficients
  below changes: {sch_f32diff} differences.)
- sigma_i(eta) = eta * sqrt((1 - abar_prev_i)/(1 - abar_i)) * sqrt(1 - abar_i/abar_prev_i);
  dir_i(eta) = sqrt(1 - abar_prev_i - sigma_i^2). sigma_0 = 0 and dir_0 = 0 for any eta (abar_prev_0 = 1).
- Every coefficient (sqrt(1/abar), sqrt(1/abar - 1), sqrt(1 - abar), sqrt(abar_prev), sigma, dir) is
  computed in float64 and cast to float32 when gathered; all step arithmetic is float32.

## Step (respaced i = S-1 .. 0; the k-th step, k = 1..S, is i = S - k)

1. One ORT call on batch 2N = [x_1..x_N, x_1..x_N], t = [t_i]*2N (int64, original scale, e.g. 980
   for the first step), y = [3]*N + [10]*N (null class 10). O_c = out[:N], O_u = out[N:]. The model
   is learn-sigma (8 output channels); DDIM ignores the variance channels 4..7.
2. CFG on the first k = cfg_channels epsilon channels: eps[:, :k] = O_u + s*(O_c - O_u) (s = 4.0),
   eps[:, k:4] = O_c (conditional only); k = 3 is DiT's quirk, k = 4 the full CFG.
3. x0 = sqrt(1/abar_i)*x - sqrt(1/abar_i - 1)*eps.
4. Mode guidance, only while i > t_stop: eps_hat = eps - ((m - x0)*lambda)*sqrt(1 - abar_i)
   (float32, in that order: difference, times lambda, times the coefficient, subtracted from eps);
   otherwise eps_hat = eps. lambda = 0.1, m = the sample's mode.
5. x0' = sqrt(1/abar_i)*x - sqrt(1/abar_i - 1)*eps_hat. No clipping.
6. x_next = (sqrt(abar_prev_i)*x0' + dir_i*eps_hat) + sigma_i*xi_k, where the noise term is added
   only for i > 0 (xi_k = noise[:, k]).

Ambiguities resolved here:
- The guided eps_hat is used for **both** the recomputed x0' and the direction term (Algorithm 1
  replaces epsilon by eps_hat in the whole DDIM update).
- sigma_t in the DDIM update is eta's DDIM sigma, not DiT's learned sigma; the guidance factor is
  sqrt(1 - abar_i), not sigma.
- Guidance is gated on the respaced index (i > t_stop), as in the DDPM sampler: t_stop = 50 never
  guides, 25 guides i = 49..26 (t = 980..520, 24 steps), 0 guides i = 49..1 (49 steps).
- eps is used directly; ADM's `ddim_sample` goes eps -> pred_xstart -> eps again, which is the same
  maths up to float rounding.
- With eta = 0 the noise is unused, but `noise.npy` keeps the same layout as the DDPM fixtures.

## Files (every case)

Cases: eta in {{0, 1}} x t_stop in {{50, 25, 0}} x cfg_channels in {{3, 4}}, directory
`eta<eta>_tstop<t_stop>_ch<k>`. N = {NUM_SAMPLES} samples, label {LABEL}, S = {STEPS},
lambda (guidance_scale) {GUIDANCE}, CFG scale {CFG_SCALE}. All 12 cases share the same modes and noise
(numpy `default_rng({SEED})`: modes first, then noise).

| file | dtype, shape | content |
|---|---|---|
| `params.json` | | label, steps, t_stop, guidance_scale, cfg_scale, cfg_channels, num_samples, sampler ("ddim"), eta |
| `modes.npy` | f32 [N,4,8,8] | mode m for sample j (standard normal) |
| `noise.npy` | f32 [N,S+1,4,8,8] | [:,0] = x_T; [:,k] = noise xi of the k-th step (respaced i = S-k); unused when eta = 0 and at k = S |
| `trajectory.npy` | f32 [N,S+1,4,8,8] | [:,0] = x_T; [:,k] = x after the k-th step |
| `latents.npy` | f32 [N,4,8,8] | trajectory[:,S], scaled latent space |
| `decoded.npy` | f32 [N,3,16,16] | decoder(latents / 0.18215), before clamping |
| `images.npy` | u8 [N,16,16,3] | clamp(decoded, -1, 1) -> (x+1)/2 -> floor(255 v + 0.5) clamped to [0,255], HWC |

## Self-checks run by the script

- eta = 0, t_stop = 50: every step equals the textbook deterministic DDIM update
  x_prev = sqrt(abar_prev)*(x - sqrt(1-abar)*eps)/sqrt(abar) + sqrt(1-abar_prev)*eps (float64 from the
  same float32 x, eps) to float32 rounding: ch3 max abs err {cf[0][0]:.2e} ({cf[0][1]:.2f} f32-eps of the
  term scale), ch4 {cf[1][0]:.2e} ({cf[1][1]:.2f}).
- The step recomputed in float64 (model calls still float32), teacher-forced from each stored input
  and free-running over all 50 steps, against the stored trajectory (per case below).
- Guidance pulls towards the modes: mean squared distance latent - mode (same noise in every case):
""" + "\n".join(f"  - {s}" for s in mode_lines) + """

Suggested tolerances for a float32 implementation: per step (teacher-forced) ~1e-5 relative to the
state scale; full trajectory ~1e-3 (the eta = 0 trajectory is deterministic, and the first steps
amplify one-ulp differences in x by sqrt(1/abar_49) ~ 130 into x0). Measured here: a float64 step
free-running on the same float32 model calls stays within 4.3e-5 of every stored trajectory. Images +-1
grey level.

## Per case (the run that wrote these files)

""" + "\n".join(f"- {s}" for s in summary) + f"""

## Respaced schedule (float64, printed)

| i | t | abar | abar_prev | sqrt(1/abar) | sqrt(1/abar-1) | sqrt(1-abar) | sigma (eta=1) | dir (eta=1) |
|---|---|---|---|---|---|---|---|---|
{rows}

(For eta = 0: sigma = 0 and dir = sqrt(1 - abar_prev).)
"""
    with open(os.path.join(pdir, "README.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
