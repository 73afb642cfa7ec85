#!/usr/bin/env bash
# Installs the servers the S3 tests start themselves: moto (an S3-compatible server that honours
# create-only puts) in .venv-test/. The tests find it there; CI sets MGD3_REQUIRE_S3=1 so that a
# missing moto fails the run instead of skipping the S3 tests. Also strace (Debian), with which
# the crash tests kill processes at chosen system calls (MGD3_REQUIRE_STRACE=1 in CI).
#
# Each install says what it is and how big before it starts; MGD3_SKIP_TORCH=1 skips the 5.6 GB
# PyTorch environment (its tests are then skipped with a note, unless MGD3_REQUIRE_TORCH=1); it needs
# about 9 GB free while it installs, checked before the download starts.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "setup_test_servers: $*"; }
# apt-get waits (up to 10 min) for the package lock another apt-get holds, e.g. the local Slurm
# cluster's install started beside this one, instead of failing and skipping the tests that need it.
if ! command -v strace >/dev/null && [[ $(id -u) -eq 0 ]]; then
  say "installing strace (Debian, about 2 MB) for the crash tests"
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends strace >/dev/null \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends strace >/dev/null; } \
    || echo "note: strace could not be installed; the crash tests will be skipped"
fi
# Chromium (Debian's headless shell), in which the report test opens the HTML report
# (MGD3_REQUIRE_CHROMIUM=1 in CI).
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null && [[ $(id -u) -eq 0 ]]; then
  say "installing chromium-headless-shell (Debian, about 200 MB installed) for the report's browser checks"
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium-headless-shell >/dev/null \
    || { apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium-headless-shell >/dev/null; } \
    || echo "note: Chromium could not be installed; the report's browser checks will be skipped"
fi
# ONNX Runtime 1.26.0's CPU library, the version of CUDA 12 clusters, for the test that it loads
# (MGD3_REQUIRE_ORT_1_26=1 in CI).
if [[ ! -f .ort/cpu-1.26.0/libonnxruntime.so.1.26.0 ]]; then
  say "installing ONNX Runtime 1.26.0's CPU library into .ort/cpu-1.26.0 (about 20 MB), for the CUDA 12 runtime's test"
  ORT_VERSION=1.26.0 scripts/setup_ort.sh cpu >/dev/null
fi
# PyTorch for scripts/evaluate.py's test and ONNX + onnxscript for the fused-export test
# (MGD3_REQUIRE_TORCH=1 in CI): the registry's build (a CUDA
# one; it runs on CPU), pinned with scripts/requirements-eval.txt.
if [[ ${MGD3_SKIP_TORCH:-} == 1 ]]; then
  say "MGD3_SKIP_TORCH=1: not installing PyTorch; the evaluation and fused-export tests will be skipped"
elif ! { [[ -x .venv-eval/bin/python ]] && .venv-eval/bin/python -c "import torch, torchvision, onnx, onnxscript, onnxruntime, diffusers" 2>/dev/null; }; then
  # Measured (2026-12-07, pip 23.2, --no-cache-dir): 2.9 GB of wheels (torch's CUDA libraries
  # are most of it), 5.6 GB installed, 8.4 GB used at the peak, when the downloaded wheels and the
  # installed files are both on disk. pip's cache would keep the 2.9 GB of wheels for good, so it
  # is off; the space is checked first, so that a full disk is named before minutes of download.
  need_mb=9000
  free_mb=$(df -Pm . | awk 'NR == 2 { print $4 }')
  if (( free_mb < need_mb )); then
    say "error: installing PyTorch into .venv-eval needs about ${need_mb} MB free on the disk of $(pwd) (8.4 GB at the peak, 5.6 GB kept); it has ${free_mb} MB. Free some space (e.g. cargo clean, old .venv-eval copies), or set MGD3_SKIP_TORCH=1 to skip PyTorch and the evaluation and fused-export tests" >&2
    exit 1
  fi
  say "installing PyTorch, torchvision, ONNX, onnxscript, ONNX Runtime and diffusers into .venv-eval for the evaluation and fused-export tests: about 2.9 GB to download, 5.6 GB on disk, a few minutes (MGD3_SKIP_TORCH=1 skips it and those tests)"
  python3 -m venv .venv-eval
  if ! .venv-eval/bin/pip install --quiet --no-cache-dir --disable-pip-version-check -r scripts/requirements-eval.txt; then
    # A half-installed environment is 5 GB that helps no one; the next run starts it again.
    rm -rf .venv-eval
    say "error: installing .venv-eval failed (pip's message is above; free disk: $(df -Pm . | awk 'NR == 2 { print $4 }') MB); MGD3_SKIP_TORCH=1 skips PyTorch and its tests" >&2
    exit 1
  fi
  say "installed .venv-eval ($(du -sh .venv-eval | cut -f1))"
fi
if [[ -x .venv-test/bin/python ]] && .venv-test/bin/python -c "import moto.server" 2>/dev/null; then
  echo "moto already installed in .venv-test"
  exit 0
fi
say "installing moto (the S3 server the S3 tests start on loopback) into .venv-test: about 140 MB"
python3 -m venv .venv-test
.venv-test/bin/pip install --quiet --no-cache-dir --disable-pip-version-check 'moto[s3]==5.*' flask flask-cors
.venv-test/bin/python -c "import moto, moto.server; print('moto', moto.__version__, 'installed in .venv-test')"
