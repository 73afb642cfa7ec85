#!/usr/bin/env bash
# Moves what scripts/gpu_check.sh needs to a device machine that has no internet, no cargo and
# takes at most 64 MiB per call, the working tree (tracked and untracked-not-ignored files, ~26 MiB)
# included:
#   - onnxruntime-gpu 1.31.1's libraries (the CUDA provider alone is 284 MB; the tensorrt one is left
#     out). With the fatbin tool at hand ($MGD3_FATBIN_KEEP, default ../shared/tools/fatbin_keep.py)
#     the CUDA provider keeps only the cubins of the device's architecture, $MGD3_CARRY_ARCH (default
#     90: H100/H200), so that it xz-compresses to ~52 MB instead of ~240 (it then loads on that
#     architecture only);
#   - the release worker and coordinator, stripped,
#   - the diffusers wheel and its one dependency the device image lacks (importlib_metadata).
# One xz archive (~72 MiB), cut into the fewest equal parts that each fit one call beside the working
# tree as it is when `pack` runs (MGD3_CARRY_LIMIT_MB, 64, less 1 MiB of slack; MGD3_CARRY_PART_MB
# sets the part size instead): 2 parts with today's tree.
#
#   here:  scripts/gpu_carry_ort.sh pack     -> .gpu-carry/part-00 .. part-NN, .gpu-carry/SHA256SUMS
#   there, one call per part but the last, carrying .gpu-carry/part-KK and .gpu-carry/SHA256SUMS
#   (calls back to back, within the warm window):
#          scripts/gpu_carry_ort.sh stash    -> moves the carried parts to /tmp/mgd3-carry
#   there, with the last part:
#          scripts/gpu_carry_ort.sh check    -> join, then scripts/gpu_check.sh in /tmp/gpu-check
#          under a time limit (MGD3_CHECK_TIMEOUT_S, 500 s), then copies its log, results and the
#          small files (timings, export and fuse logs) into $OUT, which the device tool brings back
#          (`check --dry-run` tries the same here, on the CPU)
#   or, by hand:
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
    tar -C "$work" -cf - target .ort .whl | xz -9 -T0 > "$work/carry.tar.xz"
    # What travels with every call besides its part: the files git would copy (tracked, and
    # untracked but not ignored), as they are now.
    tree=$(git ls-files -z --cached --others --exclude-standard |
      xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    total=$(stat -c %s "$work/carry.tar.xz")
    mib=1048576
    if [[ -n ${MGD3_CARRY_PART_MB:-} ]]; then
      room=$((MGD3_CARRY_PART_MB * mib))
    else
      room=$(((${MGD3_CARRY_LIMIT_MB:-64} - 1) * mib - tree))
    fi
    if ((room < 4 * mib)); then
      echo "the working tree ($((tree / mib)) MiB) leaves no room for a part under the ${MGD3_CARRY_LIMIT_MB:-64} MiB a call carries: ignore or remove the large untracked files first" >&2
      exit 1
    fi
    parts=$(((total + room - 1) / room))
    split -n "$parts" -d "$work/carry.tar.xz" .gpu-carry/part-
    (cd .gpu-carry && sha256sum part-* > SHA256SUMS)
    ls -la .gpu-carry
    echo "$parts parts of $((total / parts / mib)) MiB beside a $((tree / mib)) MiB working tree: $parts device calls (stash each part but the last, then check with the last)" ;;
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
  check)
    # The last call: everything the check writes stays in /tmp/gpu-check (the models alone are
    # ~10 GB); what comes back through $OUT is what fits its limits (a few files of at most 16 MiB).
    "$0" join > /tmp/mgd3-join.log 2>&1 || { cat /tmp/mgd3-join.log; exit 1; }
    dest=${OUT:?"check copies its results into \$OUT (set by the device tool)"}
    status=0
    timeout -k 10 "${MGD3_CHECK_TIMEOUT_S:-500}" scripts/gpu_check.sh "${@:2}" /tmp/gpu-check > /dev/null 2>&1 || status=$?
    ((status == 124)) && echo "gpu_check.sh stopped at its ${MGD3_CHECK_TIMEOUT_S:-500} s limit" | tee -a /tmp/gpu-check/check.log
    cp /tmp/gpu-check/check.log /tmp/gpu-check/results.txt "$dest/" 2>/dev/null
    (cd /tmp/gpu-check && tar -czf "$dest/files.tar.gz" --ignore-failed-read ./*.log ./*.json ./*.txt ./job-*/job.toml 2>/dev/null)
    tail -c 11000 /tmp/gpu-check/check.log
    exit "$status" ;;
  *) echo "usage: $0 pack|stash|join|check" >&2; exit 2 ;;
esac
