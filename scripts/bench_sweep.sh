#!/usr/bin/env bash
# Sweep benchmark: what a 3 x 3 lambda x t_stop sweep of the Fashion-MNIST demo costs against one job.
#
# Runs, side by side on this machine with the release binaries (scripts/setup.sh builds them and
# makes data/fashion-mnist):
#   1. the demo job (examples/fashion-mnist.toml) alone, into a fresh folder: no cache, so it
#      decodes, encodes and clusters every real image — what each of 9 separate jobs would do;
#   2. the same spec with [sweep] guidance_scale = [0.05, 0.1, 0.2], stop_guidance = [15, 25, 35]
#      as one `coordinator run`, into another fresh folder.
# and prints, from the manifests' stage seconds (decode + encode + k-means = the data phase;
# DiT + guidance + VAE decode + PNG = sampling), the sweep's total against one job's
# 1.3 x data + 9 x sampling (the target: a ratio <= 1), how many classes reused encodings and
# modes, and the wall-clock times: the sweep against 9 separate jobs (9 x the job alone).
# Results go to target/bench-sweep/result.json as well.
#
# Environment: MGD3_BENCH_WORKERS (1) local workers for both runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
workers="${MGD3_BENCH_WORKERS:-1}"
bin=target/release
for b in coordinator worker; do
  [[ -x $bin/$b ]] || { echo "no $bin/$b: run scripts/setup.sh (it builds the release binaries) first" >&2; exit 1; }
done
[[ -d data/fashion-mnist/train ]] || { echo "no data/fashion-mnist: run scripts/setup.sh first" >&2; exit 1; }

work=target/bench-sweep
rm -rf "$work" && mkdir -p "$work"
# The demo spec with its output moved here; the sweep is that spec plus a [sweep] table.
sed -e "s|^output = .*|output = \"$root/$work/single\"|" \
    -e "s|\.\./|$root/|g" examples/fashion-mnist.toml > "$work/single.toml"
sed -e "s|/single\"|/sweep\"|" "$work/single.toml" > "$work/sweep.toml"
printf '\n[sweep]\nguidance_scale = [0.05, 0.1, 0.2]\nstop_guidance = [15, 25, 35]\n' >> "$work/sweep.toml"

timed() { # timed NAME SPEC: runs the spec, prints seconds
  local start end
  start=$(date +%s.%N)
  "$bin/coordinator" run "$2" --local-workers "$workers" --no-report --quiet >"$work/$1.out" 2>"$work/$1.log" \
    || { echo "coordinator run $2 failed: see $work/$1.log" >&2; tail -5 "$work/$1.log" >&2; exit 1; }
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.2f}')"
}
echo "one job (examples/fashion-mnist.toml, no cache) ..." >&2
single_s=$(timed single "$work/single.toml")
echo "the 3 x 3 sweep ..." >&2
sweep_s=$(timed sweep "$work/sweep.toml")

python3 - "$work" "$single_s" "$sweep_s" <<'PY'
import glob, json, os, sys
work, single_s, sweep_s = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def manifests(out):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "jobs", "*", "manifest.json")))]
def phases(m):
    t = m["timings"]
    return t["decode"] + t["encode"] + t["kmeans"], t["dit"] + t["guidance"] + t["vae_decode"] + t["png"]
(single,) = manifests(os.path.join(work, "single"))
variants = manifests(os.path.join(work, "sweep"))
assert len(variants) == 9, f"{len(variants)} variants finished"
data, sampling = phases(single)
sweep_data = sum(phases(m)[0] for m in variants)
sweep_sampling = sum(phases(m)[1] for m in variants)
budget = 1.3 * data + 9 * sampling
result = {
    "single": {"data_s": data, "sampling_s": sampling, "wall_s": single_s},
    "sweep": {"data_s": sweep_data, "sampling_s": sweep_sampling, "wall_s": sweep_s,
              "latents_reused": sum(m["reused"]["latents"] for m in variants),
              "modes_reused": sum(m["reused"]["modes"] for m in variants),
              "classes": sum(len(m["classes"]) for m in variants)},
    "target_s": budget,
    "ratio_to_target": (sweep_data + sweep_sampling) / budget,
    "data_ratio": sweep_data / data,
    "wall_vs_nine_jobs": sweep_s / (9 * single_s),
}
json.dump(result, open(os.path.join(work, "result.json"), "w"), indent=2)
print(f"one job:   data phase {data:.1f} s, sampling {sampling:.1f} s (stage seconds), wall {single_s:.1f} s")
print(f"sweep x9:  data phase {sweep_data:.1f} s ({sweep_data / data:.2f} x one job's), sampling {sweep_sampling:.1f} s "
      f"({sweep_sampling / sampling:.2f} x), wall {sweep_s:.1f} s")
print(f"reused:    latents {result['sweep']['latents_reused']} and modes {result['sweep']['modes_reused']} "
      f"of {result['sweep']['classes']} variant classes")
print(f"sweep / (1.3 x data + 9 x sampling) = {result['ratio_to_target']:.3f} (target <= 1)")
print(f"sweep wall / 9 separate jobs' wall = {result['wall_vs_nine_jobs']:.3f}")
PY
