#!/usr/bin/env bash
# Engine benchmark: per-class time split, ONNX Runtime share of sampling, batch-1 vs batched
# images/s, measured side by side in one run (release build). See worker/benches/engine.rs for
# the MGD3_BENCH_* variables that point it at real models and data.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_ort.sh >/dev/null
exec cargo bench -p mgd3-worker --bench engine "$@"
