#!/usr/bin/env bash
# Installs the ONNX Runtime shared library the workers load at run time (ort `load-dynamic`).
#
# No CDN download: the library is taken from the official PyPI wheel, which is a zip holding
# onnxruntime/capi/libonnxruntime.so.<version>. The result lands in .ort/<flavour>/ inside the
# repository; .cargo/config.toml points ORT_DYLIB_PATH at the CPU build so `cargo test` finds it.
#
#   scripts/setup_ort.sh           CPU build (onnxruntime==1.31.1)
#   scripts/setup_ort.sh gpu       CUDA 13 build (onnxruntime-gpu==1.31.1) into .ort/gpu/:
#                                  driver R580+, CUDA 13 and cuDNN 9 libraries
#   scripts/setup_ort.sh gpu-cu12  CUDA 12 build (onnxruntime-gpu==1.26.0, the newest CUDA 12 wheel
#                                  on PyPI) into .ort/gpu-cu12/: driver R525+, CUDA 12 and cuDNN 9
#                                  libraries; the workers take it with --ort-lib or ORT_DYLIB_PATH
#
# ORT_VERSION=X picks another version of the flavour (installed into .ort/<flavour>-X/); mgd3
# loads ONNX Runtime 1.26 or newer (the `ort` binding is built at API level 26).
set -euo pipefail
flavour="${1:-cpu}"
root="$(cd "$(dirname "$0")/.." && pwd)"
case "$flavour" in
  cpu) package="onnxruntime" default_version=1.31.1 ;;
  gpu) package="onnxruntime-gpu" default_version=1.31.1 ;;
  gpu-cu12) package="onnxruntime-gpu" default_version=1.26.0 ;;
  *) echo "usage: $0 [cpu|gpu|gpu-cu12]" >&2; exit 2 ;;
esac
ORT_VERSION="${ORT_VERSION:-$default_version}"
dest="$root/.ort/$flavour"
[[ $ORT_VERSION == "$default_version" ]] || dest="$root/.ort/$flavour-$ORT_VERSION"
lib="$dest/libonnxruntime.so.$ORT_VERSION"
if [[ -f "$lib" ]]; then
  echo "ONNX Runtime $ORT_VERSION ($flavour) already installed: $lib"
  exit 0
fi
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $package==$ORT_VERSION wheel from PyPI ..."
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.11 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 "$package==$ORT_VERSION" -d "$tmp"
wheel="$(ls "$tmp"/*.whl)"
mkdir -p "$dest"
"$python" - "$wheel" "$dest" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("lib") and ".so" in base:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
test -f "$lib" || { echo "the wheel did not contain libonnxruntime.so.$ORT_VERSION" >&2; exit 1; }
echo "installed ONNX Runtime $ORT_VERSION ($flavour) into $dest"
ls -1 "$dest"
