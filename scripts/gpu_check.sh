#!/usr/bin/env bash
# One command for a GPU machine (H100/H200, CUDA 13 driver, PyTorch installed, no internet):
# builds (or uses carried) release binaries, exports real-size DiT-XL/2 and SD-VAE with random
# weights (fp32 and fp16), distils one class on CUDA at several batch sizes and prints images/s,
# GPU memory and MFU against the ≈23.7 TFLOP/image DiT cost, next to a PyTorch baseline
# (batch-1 reference-style loop and a batched loop) measured in the same run.
#
#   scripts/gpu_check.sh [OUT_DIR]          (OUT_DIR defaults to $OUT or ./gpu-check)
#
# ONNX Runtime GPU: .ort/gpu must hold the onnxruntime-gpu 1.31.1 capi libraries. The 255 MB wheel
# does not fit one device call's 64 MiB carry: `scripts/gpu_carry_ort.sh split` cuts it into parts
# here, consecutive calls carry them, `scripts/gpu_carry_ort.sh join` reassembles and unpacks there.
# CUDA 13 / cuDNN 9 come from PyTorch's nvidia-* packages on the device (put on LD_LIBRARY_PATH below).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
peak_tflops=${MGD3_PEAK_TFLOPS:-989}   # dense fp16/bf16 tensor-core peak of an H100/H200 SXM
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

[[ -f .ort/gpu/libonnxruntime.so ]] || { echo "missing .ort/gpu (see scripts/gpu_carry_ort.sh)"; exit 1; }
export ORT_DYLIB_PATH=$PWD/.ort/gpu/libonnxruntime.so
nv=$(python3 -c "import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + '/nvidia')" 2>/dev/null || true)
if [[ -n $nv ]]; then
  export LD_LIBRARY_PATH=$(ls -d "$nv"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
fi

[[ -x target/release/worker ]] || cargo build --release -p mgd3-worker --bin worker
models=$out/models
[[ -f $models/fp32/dit.onnx ]] || python3 scripts/gpu_models.py "$models/fp32"
[[ -f $models/fp16/dit.onnx ]] || python3 scripts/gpu_models.py "$models/fp16" --fp16

data=$out/data
if [[ ! -d $data/n01440764 ]]; then
  python3 - "$data/n01440764" <<'PY'
import os, sys
import numpy as np
from PIL import Image
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(256):
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(f"{d}/{i:04d}.jpg", quality=90)
PY
fi

results=$out/results.txt
: > "$results"
for precision in fp16 fp32; do
  for batch in 2 16 64 128; do
    timings=$out/timings-$precision-$batch.json
    nvidia-smi --query-gpu=memory.used --format=csv,noheader -lms 200 > "$out/mem-$precision-$batch.txt" &
    smi=$!
    target/release/worker distill-class --data "$data" --class n01440764 --label 0 --ipc 64 \
      --dit "$models/$precision/dit.onnx" --vae-encoder "$models/$precision/vae_encoder.onnx" \
      --vae-decoder "$models/$precision/vae_decoder.onnx" --out "$out/distilled-$precision-$batch" \
      --device cuda:0 --max-batch "$batch" --timings-json "$timings" --cfg-channels 3
    kill $smi
    python3 - "$timings" "$precision" "$batch" "$peak_tflops" "$out/mem-$precision-$batch.txt" >> "$results" <<'PY'
import json, sys
t = json.load(open(sys.argv[1])); precision, batch, peak = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
mem = max(int(l.split()[0]) for l in open(sys.argv[5]) if l.strip())
ips = 64 / (t["dit"] + t["guidance"])
print(f"mgd3 {precision} max-batch {batch:>3}: {ips:7.2f} images/s sampling, MFU {100 * ips * 23.7 / peak:5.1f} %, "
      f"GPU memory {mem} MiB, DiT share {100 * t['dit'] / (t['dit'] + t['guidance']):.1f} %, "
      f"encode {t['encode']:.2f} s decode+png {t['vae_decode'] + t['png']:.2f} s")
PY
  done
done
for precision in "" --fp16; do
  python3 scripts/gpu_torch_baseline.py --batch 32 --images 64 $precision | tee -a "$results"
done
cat "$results"
