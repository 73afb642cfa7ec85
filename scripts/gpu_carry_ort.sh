#!/usr/bin/env bash
# Moves what scripts/gpu_check.sh needs to a device machine that has no internet, no cargo and
# takes at most 64 MiB per call (the working tree, ~20 MB, included):
#   - onnxruntime-gpu 1.31.1's libraries (the CUDA provider alone is 284 MB; the tensorrt one is left
#     out). With the fatbin tool at hand ($MGD3_FATBIN_KEEP, default ../shared/tools/fatbin_keep.py)
#     the CUDA provider keeps only the cubins of the device's architecture, $MGD3_CARRY_ARCH (default
#     90: H100/H200), so that it xz-compresses to ~52 MB instead of ~240 (it then loads on that
#     architecture only);
#   - the release worker and coordinator, stripped,
#   - the diffusers wheel and its one dependency the device image lacks (importlib_metadata).
# One xz archive, cut into parts of MGD3_CARRY_PART_MB (40) MB:
#
#   here:  scripts/gpu_carry_ort.sh pack     -> .gpu-carry/part-00 .. part-NN, .gpu-carry/SHA256SUMS
#   there, one call per part, carrying .gpu-carry/part-KK (calls back to back, within the warm window):
#          scripts/gpu_carry_ort.sh stash    -> moves the carried parts to /tmp/mgd3-carry
#   there, with the last part:
#          scripts/gpu_carry_ort.sh join     -> checks the sums, unpacks .ort/gpu, target/release, .whl
#          and installs the wheels into /tmp/site (put it on PYTHONPATH)
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.31.1
stash=/tmp/mgd3-carry
case ${1:-} in
  pack)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    cargo build --release -q -p mgd3-worker -p mgd3-coordinator --bin worker --bin coordinator
    mkdir -p "$work/target/release" "$work/.ort/gpu" "$work/.whl"
    strip -o "$work/target/release/worker" target/release/worker
    strip -o "$work/target/release/coordinator" target/release/coordinator
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 "onnxruntime-gpu==$version" -d "$work/wheel"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work/.whl" diffusers==0.42.1 importlib_metadata==10.2.0
    python3 - "$work/wheel"/onnxruntime_gpu-*.whl "$work/.ort/gpu" <<'PY'
import os, sys, zipfile
wanted = ("libonnxruntime.so.", "libonnxruntime_providers_shared.so", "libonnxruntime_providers_cuda.so")
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        b = os.path.basename(n)
        if n.startswith("onnxruntime/capi/") and b.startswith(wanted):
            with open(os.path.join(sys.argv[2], b), "wb") as f:
                f.write(z.read(n))
PY
    ln -s "libonnxruntime.so.$version" "$work/.ort/gpu/libonnxruntime.so"
    keep=${MGD3_FATBIN_KEEP:-../shared/tools/fatbin_keep.py}
    if [[ -f $keep ]]; then
      provider=$work/.ort/gpu/libonnxruntime_providers_cuda.so
      python3 "$keep" "$provider" "$provider.kept" --keep "${MGD3_CARRY_ARCH:-90}"
      mv "$provider.kept" "$provider"
      echo "CUDA provider: cubins for sm_${MGD3_CARRY_ARCH:-90} only (it loads on that architecture only)"
    else
      echo "note: $keep not found: the CUDA provider keeps every architecture (about 5 more parts)"
    fi
    mkdir -p .gpu-carry && rm -f .gpu-carry/part-* .gpu-carry/SHA256SUMS
    tar -C "$work" -cf - target .ort .whl | xz -9 -T0 | split -b "${MGD3_CARRY_PART_MB:-40}M" -d - .gpu-carry/part-
    (cd .gpu-carry && sha256sum part-* > SHA256SUMS)
    ls -la .gpu-carry ;;
  stash)
    mkdir -p "$stash"
    for part in .gpu-carry/part-*; do
      [[ -e $part ]] || continue
      mv "$part" "$stash/"
    done
    [[ -f .gpu-carry/SHA256SUMS ]] && cp .gpu-carry/SHA256SUMS "$stash/"
    ls -la "$stash" ;;
  join)
    "$0" stash >/dev/null
    (cd "$stash" && sha256sum -c --quiet SHA256SUMS)
    cat "$stash"/part-* | xz -d | tar -xf -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    ls -la .ort/gpu target/release ;;
  *) echo "usage: $0 pack|stash|join" >&2; exit 2 ;;
esac
