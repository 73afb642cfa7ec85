#!/usr/bin/env bash
# Pipeline benchmark: mgd3's data phase against the authors' PyTorch-style pipeline, on the same
# real JPEG photographs and the same stand-in models.
#
# What it measures (reference side, scripts/bench_reference.py, P = all CPUs by default):
#   - PIL decode + ADM center_crop_arr + ToTensor/Normalize images/s on one core (and the decode-,
#     resize- and to-tensor-only rates);
#   - the data phase at IPC 10, 50, 100: list the class, load on a Pool(P) of 64-image batches,
#     VAE-encode (onnxruntime, P threads), scikit-learn KMeans; per-stage split and total;
#   - scikit-learn KMeans fit alone at k = 10, 50, 100 with 1 and P threads, inertia, iterations;
# then the Rust side (cargo bench -p mgd3-worker --bench pipeline) measures the same on the same
# files and clusters the same features (MGD3_BENCH_FEATURES), checks its crops against PIL's
# (MGD3_BENCH_CROPS) and compares with MGD3_BENCH_REFERENCE.
#
# Inputs it makes once and reuses (delete them to rebuild):
#   .venv-bench/                      python3 venv with scripts/requirements-bench.txt
#   .ort/cpu/                         ONNX Runtime (scripts/setup_ort.sh)
#   target/bench-data/imagenet-like/  ImageNet-shaped ImageFolder of real photographs
#                                     (scripts/bench_make_dataset.py; rebuilt when the parameters change)
#   target/bench-data/models/         stand-in DiT-XL/2-256 and sd-vae-ft-mse ONNX models
#                                     (scripts/bench_make_standin_models.py)
# Outputs of each run: target/bench-data/{reference.json,features.npy,crops.npy}.
# Run it on a quiet machine: on 2 cores anything else running (a cargo build) slows the
# reference's P-thread k-means by up to 10-40x (OpenMP busy-waiting); reference.json records the
# load average before and after.
#
# Environment:
#   MGD3_BENCH_CLASSES (5), MGD3_BENCH_PER_CLASS (1300), MGD3_BENCH_SEED (0)  dataset size and seed
#   MGD3_BENCH_PROCESSES (all CPUs)   P of the reference pipeline
#   MGD3_BENCH_REPEATS (1)            reference data phases per IPC (the fastest is kept)
#   MGD3_BENCH_PYTHON_ONLY=1          stop after the reference side (no cargo)
# Extra arguments go to `cargo bench`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

classes="${MGD3_BENCH_CLASSES:-5}"
per_class="${MGD3_BENCH_PER_CLASS:-1300}"
seed="${MGD3_BENCH_SEED:-0}"
processes="${MGD3_BENCH_PROCESSES:-$(nproc)}"
repeats="${MGD3_BENCH_REPEATS:-1}"
bench="$root/target/bench-data"
data="$bench/imagenet-like"
models="$bench/models"
venv="$root/.venv-bench"
requirements="$root/scripts/requirements-bench.txt"

# 1. the venv, (re)installed when the requirements file changed
if [[ ! -x "$venv/bin/python" ]] || ! cmp -s "$requirements" "$venv/.requirements.txt"; then
  echo "== setting up $venv"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/.requirements.txt"
fi
py="$venv/bin/python"

# 2. ONNX Runtime for the Rust side
scripts/setup_ort.sh >/dev/null

# 3. the dataset and the stand-in models
mkdir -p "$bench"
echo "== dataset ($classes classes x $per_class images, seed $seed)"
"$py" scripts/bench_make_dataset.py --out "$data" --classes "$classes" --per-class "$per_class" \
  --seed "$seed" --if-needed
if [[ ! -f "$models/vae_encoder.onnx" || ! -f "$models/vae_decoder.onnx" || ! -f "$models/dit.onnx" ]]; then
  echo "== stand-in models"
  "$py" scripts/bench_make_standin_models.py --out "$models"
fi

# 4. the reference pipeline on the first class
class="$(head -n 1 "$data/classes.txt")"
echo "== reference pipeline (class $class, P = $processes)"
"$py" scripts/bench_reference.py --data "$data" --class "$class" --models "$models" \
  --processes "$processes" --repeats "$repeats" --features-out "$bench/features.npy" --json-out "$bench/reference.json" \
  --crops-out "$bench/crops.npy"

if [[ "${MGD3_BENCH_PYTHON_ONLY:-0}" == "1" ]]; then
  echo "MGD3_BENCH_PYTHON_ONLY=1: stopping before cargo bench; results in $bench"
  exit 0
fi

# 5. the Rust side
echo "== cargo bench -p mgd3-worker --bench pipeline"
export MGD3_BENCH_DATA="$data" MGD3_BENCH_MODELS="$models" MGD3_BENCH_REFERENCE="$bench/reference.json"
export MGD3_BENCH_FEATURES="$bench/features.npy" MGD3_BENCH_CROPS="$bench/crops.npy"
exec cargo bench -p mgd3-worker --bench pipeline "$@"
