#!/usr/bin/env bash
# Installs what mgd3 needs on a fresh Debian/Ubuntu machine with Rust: ONNX Runtime (from the
# PyPI wheel, no CDN), the Fashion-MNIST demo data (Debian package) converted to an ImageFolder
# under data/fashion-mnist, and a release build of the binaries. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null \
    || { $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null && $sudo_cmd apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends dataset-fashion-mnist >/dev/null; }
fi
scripts/setup_ort.sh
# The longest step (8 to 14 minutes on 2 cores): cargo shows what it compiles as it goes.
echo "setup: building the release binaries (cargo's progress follows; about 8 to 14 minutes on 2 cores)"
cargo build --release -p mgd3-worker -p mgd3-coordinator --bins
if [[ ! -f data/fashion-mnist/classes.txt ]]; then
  target/release/worker import-fashion-mnist --out data/fashion-mnist
fi
echo "setup done: ONNX Runtime in .ort/cpu, data in data/fashion-mnist, binaries in target/release"
