#!/usr/bin/env bash
# Moves the onnxruntime-gpu 1.31.1 wheel (255 MB) to a device machine whose calls carry at most
# 64 MiB each and which has no internet:
#   here:  scripts/gpu_carry_ort.sh split     -> .gpu-carry/part-00 .. part-NN (60 MB each)
#   carry one part per call (ignored paths already on the warm machine are kept), then there:
#          scripts/gpu_carry_ort.sh join      -> .ort/gpu/ (capi libraries incl. the CUDA provider)
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
  split)
    mkdir -p .gpu-carry && rm -f .gpu-carry/part-*
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 "onnxruntime-gpu==1.31.1" -d .gpu-carry
    split -b 60M -d .gpu-carry/onnxruntime_gpu-*.whl .gpu-carry/part-
    rm .gpu-carry/onnxruntime_gpu-*.whl
    ls -la .gpu-carry ;;
  join)
    cat .gpu-carry/part-* > /tmp/ort-gpu.whl
    mkdir -p .ort/gpu
    python3 - <<'PY'
import os, zipfile
with zipfile.ZipFile("/tmp/ort-gpu.whl") as z:
    for n in z.namelist():
        b = os.path.basename(n)
        if n.startswith("onnxruntime/capi/") and b.startswith("lib") and ".so" in b:
            open(os.path.join(".ort/gpu", b), "wb").write(z.read(n))
PY
    ln -sf libonnxruntime.so.1.31.1 .ort/gpu/libonnxruntime.so
    ls -la .ort/gpu ;;
  *) echo "usage: $0 split|join" >&2; exit 2 ;;
esac
