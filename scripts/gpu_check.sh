#!/usr/bin/env bash
# The GPU check (issues 18 and 28): one command for an H100/H200-class machine with PyTorch, a CUDA
# 13 driver and no internet. It exports real-size DiT-XL/2-256 and SD-VAE with random weights (fp32
# and fp16), rewrites them into the fused graph (export_onnx.py fuse: one fused attention node per
# block) and prints each graph's census, distils one class (IPC 128) on CUDA with the plain and the
# fused graphs at 256 and 512 DiT rows and a job of 8 classes in one shard, and prints images/s,
# GPU memory, MFU against the ≈23.7 TFLOP/image DiT cost and the VAE encode and decode rates, next
# to a PyTorch baseline (batched loop, eager and with SDPA, and the image-by-image reference loop)
# on the same model in the same run, then a bf16 DiT, the CUDA VAE graph (export_onnx.py cuda-vae:
# fused GroupNorm, NHWC convolutions), the same job with one DiT batch at a time
# (--overlap off) and, within a time budget (MGD3_CHECK_BUDGET_S, 390 s, so that the whole check
# takes ~8 minutes), the fused fp16 class with --dit-rows auto (rows chosen from the card's free
# memory), PyTorch's eager attention, fp32, the VAE in NCHW and the calls without ONNX Runtime's
# I/O binding (each run's results quote its model-load line: whether the binding was kept on
# CUDA, with the provider options). Every section runs even
# when one before it failed; the summary names the failures and the exit status is non-zero if
# there were any.
#
#   scripts/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR defaults to $OUT or ./gpu-check)
#
# --dry-run runs the same sections on the CPU at toy sizes (2 steps, a few images), with the
# CUDA-only steps (nvidia-smi, the GPU ONNX Runtime) skipped: run it here before spending device time.
#
# What it needs there (scripts/gpu_carry_ort.sh packs it here and unpacks it there):
#   target/release/{worker,coordinator}   carried binaries (cargo is not on the device);
#   .ort/gpu/                             onnxruntime-gpu 1.31.1's libraries (CUDA 13, cuDNN 9 from
#                                         PyTorch's nvidia-* packages, put on LD_LIBRARY_PATH below);
#   diffusers importable                  for the VAE (carried wheels, installed into /tmp/site).
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec > >(tee -a "$out/check.log") 2>&1
peak_tflops=${MGD3_PEAK_TFLOPS:-989} # dense fp16/bf16 tensor-core peak of an H100/H200 SXM
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}
[[ -d /tmp/site ]] && PYTHONPATH=$PYTHONPATH:/tmp/site
python=${PYTHON:-python3}

if ((dry)); then
  device=cpu
  ort_lib=$PWD/.ort/cpu/libonnxruntime.so
  # 4 steps with t_stop 2: steps i = 3 is guided, so the dry run exercises the guided path too.
  steps=(--steps 4 --stop-guidance 2)
  real=8 ipc=2
  # bf16-fused and fp16-cuda (the CUDA VAE graph): no CPU kernels; their exports and CPU checks run
  batches=(fp16-fused:4 fp16:4 fp16-fused:8 fp32-fused:4 fp32:4)
  job_classes=2 job_ipc=2 job_real=4 job_batch=4  # 2 DiT batches: two in flight
  torch=(--device cpu --steps 2 --batch 2 --images 2 --batch1-images 1)
else
  device=cuda:0
  ort_lib=$PWD/.ort/gpu/libonnxruntime.so
  steps=()
  real=128 ipc=128
  # fp16:512 is IPC 128 at --max-batch 512: one class decoded in one call once crashed ORT's CUDA
  # Resize (2^31 elements); the VAE's own batch and the per-call element ceiling bound it now.
  batches=(fp16-fused:256 fp16:256 fp16-fused:512 bf16-fused:256 fp16-cuda:256 fp32-fused:256)
  job_classes=8 job_ipc=32 job_real=64 job_batch=256  # 256 samples: 2 DiT batches of 128 in flight
  torch=(--device cuda --steps 50 --batch 64 --images 128 --batch1-images 2)
fi
# λ = 0: on random weights x̂₀ is far from any mode and λ = 0.1 trips the divergence guard at the
# first guided step; with λ = 0 the guided steps still compute the guidance term (it is zero), so
# their cost is measured. Real weights use the job's λ.
lambda=0
export ORT_DYLIB_PATH=$ort_lib
nv=$("$python" -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null || true)
if [[ -n $nv ]]; then
  LD_LIBRARY_PATH=$(find "$nv" -maxdepth 2 -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}
  export LD_LIBRARY_PATH
fi

failures=()
# section NAME COMMAND...: runs one part of the check, timed; a failure is recorded, not fatal.
section() {
  local name=$1 started=$SECONDS status
  shift
  echo "== $name"
  "$@"
  status=$?
  if ((status == 0)); then
    echo "-- $name: ok, $((SECONDS - started)) s"
  else
    echo "-- $name: FAILED (exit $status) after $((SECONDS - started)) s"
    failures+=("$name")
  fi
}

# memory_watch FILE: samples the GPU's used memory every 200 ms into FILE until killed (GPU only).
memory_watch() {
  ((dry)) && return
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$1" &
  watcher=$!
}
memory_stop() {
  ((dry)) && return
  kill "$watcher" 2>/dev/null
  wait "$watcher" 2>/dev/null
}

machine() {
  if ((dry)); then
    echo "dry run on $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  fi
  "$python" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  ls -la "$ort_lib" target/release/worker target/release/coordinator
}

models() {
  local status=0
  # fp32 and fp16 export side by side on the device (each is CPU-bound for about a minute and
  # needs ~10 GB); one after the other in a dry run, where memory is short.
  [[ -f $out/models/fp32/dit.onnx ]] || "$python" scripts/gpu_models.py "$out/models/fp32" > "$out/export-fp32.log" 2>&1 &
  local fp32=$!
  ((dry)) && { wait $fp32 || status=1; }
  [[ -f $out/models/fp16/dit.onnx ]] || "$python" scripts/gpu_models.py "$out/models/fp16" --fp16 > "$out/export-fp16.log" 2>&1 &
  local fp16=$!
  ((dry)) || { wait $fp32 || status=1; }
  wait $fp16 || status=1
  # The fused graphs, rewritten from the plain exports (each checked against its source on the CPU).
  local precision model pids=()
  for precision in fp32 fp16; do
    mkdir -p "$out/models/$precision-fused"
    for model in dit vae_encoder vae_decoder; do
      [[ -f $out/models/$precision-fused/$model.onnx ]] && continue
      "$python" scripts/export_onnx.py fuse "$out/models/$precision/$model.onnx" \
        "$out/models/$precision-fused/$model.onnx" > "$out/fuse-$precision-$model.log" 2>&1 &
      pids+=($!)
      ((dry)) && { wait $! || status=1; }
    done
  done
  # The CUDA VAE graph (fused GroupNorm, NHWC convolutions, fused attention) in fp16, from the plain
  # fp32 VAE, checked on the CPU with its CUDA-only operators spelt out; with the fused fp16 DiT.
  mkdir -p "$out/models/fp16-cuda"
  for model in vae_encoder vae_decoder; do
    [[ -f $out/models/fp16-cuda/$model.onnx ]] && continue
    "$python" scripts/export_onnx.py cuda-vae --fp16 "$out/models/fp32/$model.onnx" "$out/models/fp16-cuda/$model.onnx" \
      > "$out/fuse-cuda-$model.log" 2>&1 &
    pids+=($!)
    ((dry)) && { wait $! || status=1; }
  done
  ln -sf ../fp16-fused/dit.onnx "$out/models/fp16-cuda/dit.onnx"
  # bf16: the DiT alone (bfloat16 inside, fp32 I/O; ONNX Runtime's CPU provider cannot run it), with
  # the fused fp16 VAE (a VAE is convolutions, which have no bfloat16 in ONNX opset 18).
  mkdir -p "$out/models/bf16-fused"
  [[ -f $out/models/bf16-fused/dit.onnx ]] ||
    "$python" scripts/gpu_models.py "$out/models/bf16-fused" --bf16 --graph fused > "$out/export-bf16.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  ln -sf ../fp16-fused/vae_encoder.onnx "$out/models/bf16-fused/vae_encoder.onnx"
  ln -sf ../fp16-fused/vae_decoder.onnx "$out/models/bf16-fused/vae_decoder.onnx"
  tail -n 3 "$out"/export-*.log 2>/dev/null
  grep -h '^\[fuse\]\|^\[cuda-vae\]\|^\[compare\]' "$out"/fuse-*.log
  "$python" - "$out/models" >> "$out/results.txt" <<'PY'
import glob, os, sys
import export_onnx as E
for path in sorted(glob.glob(f"{sys.argv[1]}/*/*.onnx")):
    if not os.path.islink(path):
        print(f"census {os.path.relpath(path, sys.argv[1])}: {E.census_line(E.graph_census(path))}")
PY
  ls -la "$out"/models/*/
  return $status
}

# images DIR CLASSES COUNT: an ImageNet-shaped ImageFolder of random 500x375 JPEGs.
images() {
  "$python" - "$@" <<'PY'
import os, sys
import numpy as np
from PIL import Image
root, classes, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
for c in range(classes):
    d = os.path.join(root, f"n{1440764 + c:08d}")
    os.makedirs(d, exist_ok=True)
    for i in range(count):
        path = os.path.join(d, f"{i:04d}.JPEG")
        if not os.path.exists(path):
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
PY
}

# one_class VARIANT MAX_BATCH [nchw|unbound]: one class end to end by `worker distill-class` with
# the models of $out/models/VARIANT (fp16, fp32, fp16-fused, bf16-fused, fp16-cuda, fp32-fused); `nchw` runs
# the VAE's convolutions in NCHW instead of the default NHWC (MGD3_VAE_NHWC=false), `unbound` the
# calls without ONNX Runtime's I/O binding (MGD3_IO_BINDING=off).
one_class() {
  local precision=$1 batch=$2 name=$1-$2${3:+-$3}
  local nhwc=true binding=on
  [[ ${3:-} == nchw ]] && nhwc=false
  [[ ${3:-} == unbound ]] && binding=off
  memory_watch "$out/memory-$name.txt"
  MGD3_IO_BINDING=$binding MGD3_VAE_NHWC=$nhwc target/release/worker distill-class --data "$out/data-one" --class n01440764 --label 0 --ipc "$ipc" \
    --dit "$out/models/$precision/dit.onnx" --vae-encoder "$out/models/$precision/vae_encoder.onnx" \
    --vae-decoder "$out/models/$precision/vae_decoder.onnx" --out "$out/distilled-$name" \
    --device "$device" --max-batch "$batch" --timings-json "$out/timings-$name.json" --cfg-channels 3 \
    --guidance-scale "$lambda" "${steps[@]}"
  local status=$?
  memory_stop
  ((status == 0)) || return $status
  # How each model ran (precision, graph, provider options, I/O binding kept or not).
  grep -ho 'models loaded: DiT [^;]*' "$out/check.log" | tail -1 | sed "s/^/mgd3 one class $name: /" >> "$out/results.txt"
  # --dit-rows auto: what the worker chose, and from what (its one INFO line).
  [[ $batch == auto ]] && grep -ho 'DiT rows per call chosen from the free memory: .*)' "$out/check.log" | tail -1 |
    sed "s/^/mgd3 one class $name: /" >> "$out/results.txt"
  "$python" - "$out" "$name" "$ipc" "$peak_tflops" "${#steps[@]}" >> "$out/results.txt" <<'PY'
import json, os, sys
out, name, ipc, peak, toy = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] != "0"
t = json.load(open(f"{out}/timings-{name}.json"))
# With two DiT batches in flight the DiT and guidance times overlap: the wall clock counts.
sampling = t.get("sampling_wall") or t["dit"] + t["guidance"]
ips = ipc / sampling
memory = f"{out}/memory-{name}.txt"
peak_mib = max((int(l) for l in open(memory) if l.strip().isdigit()), default=0) if os.path.exists(memory) else 0
mfu = "n/a (toy steps)" if toy else f"{100 * ips * 23.7 / peak:.1f} %"
print(f"mgd3 one class {name:>10}: {ips:8.3f} images/s sampling ({t['dit_calls']} DiT calls, DiT "
      f"busy {100 * t['dit'] / sampling:.1f} % of sampling), MFU {mfu}, GPU memory {peak_mib} MiB; "
      f"VAE encode {t['real_images'] / max(t['encode'], 1e-9):.1f} images/s, JPEG decode+crop "
      f"{t['real_images'] / max(t['decode'], 1e-9):.1f} images/s, k-means {t['kmeans']:.2f} s, "
      f"VAE decode {ipc / max(t['vae_decode'], 1e-9):.1f} images/s, "
      f"VAE decode+PNG {ipc / max(t['vae_decode'] + t['png'], 1e-9):.1f} images/s")
PY
}

# job PER_SHARD OVERLAP: `coordinator run` of a job of several classes, PER_SHARD classes per
# shard (and so per DiT call when their samples fit one --max-batch), with two DiT batches in
# flight (OVERLAP on) or one at a time (off).
job() {
  local per_shard=$1 overlap=$2 dir=$out/job-$1-$2
  rm -rf "$dir" && mkdir -p "$dir"
  cat > "$dir/job.toml" <<EOF
name = "gpu-check"
dataset = "$out/data-job"
classes = "all"
labels = "position"
ipc = $job_ipc
output = "$dir/out"
classes_per_shard = $per_shard
contact_sheet = false
[sampling]
cfg_channels = 3
guidance_scale = $lambda
$(((dry)) && printf 'steps = 4\nstop_guidance = 2\n')
[models]
dit = "$out/models/fp16-fused/dit.onnx"
vae_encoder = "$out/models/fp16-fused/vae_encoder.onnx"
vae_decoder = "$out/models/fp16-fused/vae_decoder.onnx"
EOF
  local cuda=()
  ((dry)) || cuda=(--device cuda)
  memory_watch "$out/memory-job-$per_shard.txt"
  local started=$SECONDS
  target/release/coordinator run "$dir/job.toml" --store "$dir/store" --local-workers 1 "${cuda[@]}" \
    --worker-bin target/release/worker --worker-arg=--max-batch=$job_batch --worker-arg=--overlap=$overlap \
    --no-report
  local status=$?
  memory_stop
  ((status == 0)) || return $status
  "$python" - "$dir" "$per_shard" "$job_batch" "$((SECONDS - started))" "$overlap" >> "$out/results.txt" <<'PY'
import glob, json, sys
d, per_shard, batch, wall, overlap = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
m = json.load(open(glob.glob(f"{d}/out/jobs/*/manifest.json")[0]))
t = m["timings"]
print(f"mgd3 job, {len(m['classes'])} classes x IPC {m['spec']['ipc']}, {per_shard} classes per shard, "
      f"--max-batch {batch}, overlap {overlap}: DiT {m['images'] / t['dit']:8.3f} images/s of DiT time, "
      f"{m['images'] / max((m['finished_unix_ms'] - m['created_unix_ms']) / 1000, 1e-9):.3f} images/s job wall "
      f"({wall} s with model loads)")
PY
}

baseline() {
  local result
  result=$("$python" scripts/gpu_torch_baseline.py "${torch[@]}" "$@") || return
  echo "$result"
  echo "torch $* $result" >> "$out/results.txt"
}

: > "$out/results.txt"
section "machine" machine
section "models (real-size DiT-XL/2 and SD-VAE, random weights)" models
section "data" images "$out/data-one" 1 "$real"
section "data (job)" images "$out/data-job" "$job_classes" "$job_real"
# Most telling first (a run cut short by its time limit keeps those): fused and plain fp16 and the
# PyTorch SDPA loop they are judged against, then the rest.
# extended NAME COMMAND...: a section that starts only while the run is within its time budget
# (MGD3_CHECK_BUDGET_S, default 390 s, so that the whole check stays within ~8 minutes).
budget=${MGD3_CHECK_BUDGET_S:-390}
extended() {
  if ((!dry && SECONDS > budget)); then
    echo "== $1: skipped, the check is past its ${budget} s budget (MGD3_CHECK_BUDGET_S)"
    return
  fi
  section "$@"
}
one_class_section() { section "one class, ${1%%:*}, --max-batch ${1##*:}" one_class "${1%%:*}" "${1##*:}"; }
one_class_section "${batches[0]}"
one_class_section "${batches[1]}"
section "torch baseline fp16 + SDPA" baseline --fp16 --sdpa
for run in "${batches[@]:2:3}"; do one_class_section "$run"; done
section "job, $job_classes classes per shard, fp16 fused, overlap on" job "$job_classes" on
section "job, $job_classes classes per shard, fp16 fused, overlap off" job "$job_classes" off
extended "one class, fp16-fused, --dit-rows auto (from the card's free memory)" one_class fp16-fused auto
extended "torch baseline fp16 (eager attention)" baseline --fp16
for run in "${batches[@]:5}"; do
  extended "one class, ${run%%:*}, --max-batch ${run##*:}" one_class "${run%%:*}" "${run##*:}"
done
extended "one class, ${batches[0]%%:*}, --max-batch ${batches[0]##*:}, VAE in NCHW" one_class "${batches[0]%%:*}" "${batches[0]##*:}" nchw
extended "one class, ${batches[0]%%:*}, --max-batch ${batches[0]##*:}, without I/O binding" one_class "${batches[0]%%:*}" "${batches[0]##*:}" unbound

echo
echo "== results (peak $peak_tflops TFLOP/s for MFU; $(date -u +%FT%TZ))"
cat "$out/results.txt"
if ((${#failures[@]})); then
  printf 'FAILED: %s\n' "${failures[@]}"
  exit 1
fi
