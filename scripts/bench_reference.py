#!/usr/bin/env python3
"""The reference side of the pipeline benchmark: what a user runs instead of mgd3, the MGD³
authors' PyTorch-style data phase (torchvision's PIL loader, ADM `center_crop_arr`, `ToTensor`,
`Normalize(0.5, 0.5)`, a DataLoader with P workers, the VAE encoder, scikit-learn k-means),
measured on the same files and the same (stand-in) ONNX models as the Rust bench.

    python scripts/bench_reference.py --data DIR --class WNID --models DIR \\
        --features-out features.npy --json-out reference.json [--crops-out crops.npy] [--processes P]
        [--repeats R]

torch is not needed: the tensors are numpy float32 computed exactly as torchvision does
(ToTensor: HWC uint8 -> CHW float32 / 255; Normalize: (x - 0.5) / 0.5; center_crop_arr and
to_tensor_normalize come from scripts/mgd3ref.py), the DataLoader is a
multiprocessing.Pool(P) whose workers collate batches of 64 into shared memory (as torch's
DataLoader workers do), and the VAE runs in onnxruntime.
Deviation from the authors' transform, as in mgd3: no RandomHorizontalFlip, so the features are
deterministic. The class's files are read once before any timing, so every measurement runs on
a warm page cache.

The JSON (--json-out) is flat except for data_phase, kmeans and versions; "images/s" is the
number of images of the class / seconds:

  schema "mgd3-bench-reference/1", class (the wnid), processes (P), images (n), image_size (256),
  batch_size (64), feature_dim (4096)

  decode_preprocess_1core_images_per_s  one process, every image of the class: PIL open +
      convert("RGB") + center_crop_arr(256) + ToTensor/Normalize
  decode_only_images_per_s   the open + convert("RGB") part of that same pass
  resize_only_images_per_s   the center_crop_arr part (BOX halvings + BICUBIC resize + crop)
  to_tensor_only_images_per_s  the ToTensor/Normalize part
  data_phase.{10,50,100}     one end-to-end data phase per IPC (the fastest of --repeats, given in
                             data_phase_repeats), in seconds:
      list_s     list the class folder (torchvision's rule: sorted os.walk, image extensions)
      session_s  create the onnxruntime session (intra_op threads = P)
      load_s     time the main loop waits for the next batch from the Pool(P) (pool start and
                 shutdown included); loading overlaps encoding, as with a DataLoader
      encode_s   VAE encoder runs (batches of 64) + mean x 0.18215 + flatten, concatenate
                 to [n, 4096]
      kmeans_s   KMeans(n_clusters=IPC, n_init="auto", random_state=0).fit (default threads)
      total_s    wall time of all of the above (= their sum up to timer overhead)
  kmeans.{10,50,100}         KMeans fit alone on the saved features, best of 3:
      seconds_1thread / seconds_all  under threadpoolctl limits of 1 and of P threads
      inertia / n_iter                sklearn's inertia_ and n_iter_ (1-thread run)
      inertia_all / n_iter_all        the same for the P-thread run
      inertia_mean_seeds / seeds      mean inertia_ over random_state 0..seeds-1 (P threads)
  crops_files                the files whose crops are in --crops-out (uint8 [m,256,256,3],
                             the center_crop_arr output before ToTensor, m = --crops)
  load_average_start / load_average_end  os.getloadavg() before and after: other work on the
                             machine skews the timings, k-means with P OpenMP threads most of all
                             (its threads busy-wait at every barrier)
  versions                   python, numpy, pillow (+ libjpeg-turbo), scikit-learn, scipy,
                             onnxruntime, threadpoolctl and the BLAS/OpenMP libraries it sees

--features-out gets the latents of the class, float32 [n, 4096] C order (posterior mean x
0.18215, in listing order), so the Rust side clusters exactly the same data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np
from PIL import Image

from mgd3ref import center_crop_arr, to_tensor_normalize

IMAGE_SIZE = 256
BATCH = 64
IPCS = (10, 50, 100)
# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------
# The reference data path (torchvision + ADM), in numpy
# ---------------------------------------------------------------------------

def list_class(class_dir: str) -> list[str]:
    """torchvision ImageFolder's listing of one class: sorted os.walk, files sorted, by extension."""
    paths = []
    for root, _, fnames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(fnames):
            if fname.lower().endswith(IMG_EXTENSIONS):
                paths.append(os.path.join(root, fname))
    return paths


def pil_loader(path: str) -> Image.Image:
    """torchvision.datasets.folder.pil_loader."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def load_batch(paths: list[str]) -> tuple[str, int]:
    """One DataLoader batch, made in a worker: loader + transform per file, collated straight into
    a shared-memory block, as torch's default_collate does in a worker (the main process then
    maps it instead of receiving 50 MB through a pipe). Returns the block's name and the batch
    size; the receiver unlinks the block (see `SharedBatch`)."""
    shape = (len(paths), 3, IMAGE_SIZE, IMAGE_SIZE)
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)) * 4)
    out = np.ndarray(shape, np.float32, buffer=shm.buf)
    for i, p in enumerate(paths):
        out[i] = to_tensor_normalize(center_crop_arr(pil_loader(p), IMAGE_SIZE))
    del out
    shm.close()
    return shm.name, len(paths)


class SharedBatch:
    """The receiving end of `load_batch`: `with SharedBatch(name, n) as batch:` maps the block as
    float32 [n, 3, S, S] and unlinks it afterwards."""

    def __init__(self, name: str, n: int):
        self.shm = shared_memory.SharedMemory(name=name)
        self.shape = (n, 3, IMAGE_SIZE, IMAGE_SIZE)

    def __enter__(self) -> np.ndarray:
        self.array = np.ndarray(self.shape, np.float32, buffer=self.shm.buf)
        return self.array

    def __exit__(self, *exc):
        del self.array
        self.shm.close()
        self.shm.unlink()


def chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------

def single_core(paths: list[str], crops: int) -> tuple[dict, np.ndarray]:
    """One pass over all files in this process, each stage timed; also keeps the first crops."""
    decode = resize = tensor = 0.0
    kept = []
    started = time.perf_counter()
    for p in paths:
        t0 = time.perf_counter()
        img = pil_loader(p)
        t1 = time.perf_counter()
        crop = center_crop_arr(img, IMAGE_SIZE)
        t2 = time.perf_counter()
        to_tensor_normalize(crop)
        t3 = time.perf_counter()
        decode += t1 - t0
        resize += t2 - t1
        tensor += t3 - t2
        if len(kept) < crops:
            kept.append(np.asarray(crop))
    wall = time.perf_counter() - started
    n = len(paths)
    rates = {
        "decode_preprocess_1core_images_per_s": n / wall,
        "decode_only_images_per_s": n / decode,
        "resize_only_images_per_s": n / resize,
        "to_tensor_only_images_per_s": n / tensor,
    }
    crops_arr = np.stack(kept) if kept else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return rates, crops_arr


def make_session(encoder_path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(encoder_path, sess_options=opts, providers=["CPUExecutionProvider"])


def scale_factor_of(encoder_path: str) -> np.float32:
    import onnx

    meta = {p.key: p.value for p in onnx.load(encoder_path, load_external_data=False).metadata_props}
    return np.float32(float(meta["mgd3.scale_factor"]))


def data_phase(class_dir: str, encoder_path: str, ipc: int, processes: int) -> tuple[dict, np.ndarray]:
    """One end-to-end data phase: list, load on a Pool(P) while encoding, then k-means."""
    from sklearn.cluster import KMeans

    scale = scale_factor_of(encoder_path)
    t_start = time.perf_counter()
    paths = list_class(class_dir)
    t_listed = time.perf_counter()
    session = make_session(encoder_path, processes)
    t_session = time.perf_counter()
    features = []
    wait = encode = 0.0
    t_wait = time.perf_counter()
    # one resource tracker for the workers' shared-memory blocks and the unlinks made here
    resource_tracker.ensure_running()
    with mp.Pool(processes) as pool:
        for name, n in pool.imap(load_batch, chunks(paths, BATCH)):
            t_got = time.perf_counter()
            wait += t_got - t_wait
            with SharedBatch(name, n) as batch:
                (mean,) = session.run(["mean"], {"image": batch})
            features.append((mean * scale).reshape(n, -1))
            t_wait = time.perf_counter()
            encode += t_wait - t_got
    wait += time.perf_counter() - t_wait  # the pool's shutdown counts as loading
    t_concat = time.perf_counter()
    x = np.ascontiguousarray(np.concatenate(features), dtype=np.float32)
    # drop the session before k-means: its idle intra-op threads would otherwise spin against
    # scikit-learn's OpenMP threads for a moment
    del session
    t_km = time.perf_counter()
    encode += t_km - t_concat
    KMeans(n_clusters=ipc, n_init="auto", random_state=0).fit(x)
    t_end = time.perf_counter()
    split = {
        "list_s": t_listed - t_start,
        "session_s": t_session - t_listed,
        "load_s": wait,
        "encode_s": encode,
        "kmeans_s": t_end - t_km,
        "total_s": t_end - t_start,
    }
    return split, x


def kmeans_bench(x: np.ndarray, k: int, processes: int, repeats: int = 3) -> dict:
    """KMeans fit alone, best of `repeats`, with 1 and with P BLAS/OpenMP threads."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    out = {}
    for label, limit in (("1thread", 1), ("all", processes)):
        best, model = float("inf"), None
        with threadpool_limits(limits=limit):
            for _ in range(repeats):
                t0 = time.perf_counter()
                model = KMeans(n_clusters=k, n_init="auto", random_state=0).fit(x)
                best = min(best, time.perf_counter() - t0)
        out[f"seconds_{label}"] = best
        suffix = "" if label == "1thread" else "_all"
        out[f"inertia{suffix}"] = float(model.inertia_)
        out[f"n_iter{suffix}"] = int(model.n_iter_)
    # One run's inertia depends on its seed (up to ~2 % at k = 10 on these features): the
    # quality comparison uses the mean over seeds 0..SEEDS-1, as the Rust side does.
    with threadpool_limits(limits=processes):
        inertias = [KMeans(n_clusters=k, n_init="auto", random_state=s).fit(x).inertia_ for s in range(SEEDS)]
    out["inertia_mean_seeds"] = float(np.mean(inertias))
    out["seeds"] = SEEDS
    return out


SEEDS = 5


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_average() -> list[float]:
    """1/5/15-minute load averages (anything else running skews the timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict:
    import onnxruntime
    import PIL
    import scipy
    import sklearn
    import threadpoolctl
    from PIL import features as pil_features

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": pil_features.version("libjpeg_turbo"),
        "scikit_learn": sklearn.__version__,
        "scipy": scipy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "threadpools": [
            {k: info.get(k) for k in ("user_api", "internal_api", "version", "num_threads")}
            for info in threadpoolctl.threadpool_info()
        ],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def rounded(value, digits=4):
    """Floats rounded for the JSON (inertias keep full precision elsewhere)."""
    if isinstance(value, dict):
        return {k: (v if k.startswith("inertia") else rounded(v, digits)) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="ImageFolder root")
    ap.add_argument("--class", dest="wnid", required=True, help="class folder (wnid) to measure")
    ap.add_argument("--models", required=True, help="folder holding vae_encoder.onnx")
    ap.add_argument("--features-out", required=True, help=".npy for the latents, float32 [n, 4096]")
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--crops-out", help=".npy for the first --crops crops, uint8 [m, 256, 256, 3]")
    ap.add_argument("--crops", type=int, default=32)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="P (default: all CPUs)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="data phases per IPC; the one with the smallest total is reported")
    a = ap.parse_args(argv)

    class_dir = os.path.join(a.data, a.wnid)
    encoder = os.path.join(a.models, "vae_encoder.onnx")
    paths = list_class(class_dir)
    if not paths:
        raise SystemExit(f"no images in {class_dir}")
    for p in paths:  # warm the page cache
        with open(p, "rb") as f:
            f.read()
    n, P = len(paths), a.processes
    load_at_start = load_average()
    print(f"reference: class {a.wnid}, {n} images, P = {P}")

    rates, crops = single_core(paths, a.crops)
    print(f"  1 core: {rates['decode_preprocess_1core_images_per_s']:.1f} images/s decode+preprocess "
          f"(decode {rates['decode_only_images_per_s']:.1f}, resize {rates['resize_only_images_per_s']:.1f}, "
          f"to-tensor {rates['to_tensor_only_images_per_s']:.1f} images/s)")

    phases, features = {}, None
    for ipc in IPCS:
        for _ in range(a.repeats):
            split, x = data_phase(class_dir, encoder, ipc, P)
            if features is None:
                features = x
            elif not np.array_equal(features, x):
                raise SystemExit("the features differ between two data phases")
            if str(ipc) not in phases or split["total_s"] < phases[str(ipc)]["total_s"]:
                phases[str(ipc)] = split
        s = phases[str(ipc)]
        print(f"  data phase IPC {ipc:3d}: total {s['total_s']:.2f} s (list {s['list_s']:.3f}, load {s['load_s']:.2f}, "
              f"encode {s['encode_s']:.2f}, k-means {s['kmeans_s']:.2f})")

    kmeans = {}
    for k in IPCS:
        kmeans[str(k)] = kmeans_bench(features, k, P)
        r = kmeans[str(k)]
        print(f"  k-means k={k:3d}: {r['seconds_1thread']:.3f} s 1 thread, {r['seconds_all']:.3f} s {P} threads; "
              f"inertia {r['inertia']:.6g} ({r['n_iter']} iterations)")

    np.save(a.features_out, features)
    if a.crops_out:
        np.save(a.crops_out, np.ascontiguousarray(crops))
    result = {
        "schema": "mgd3-bench-reference/1",
        "class": a.wnid,
        "processes": P,
        "images": n,
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH,
        "feature_dim": int(features.shape[1]),
        **rounded(rates, 2),
        "data_phase": {k: rounded(v) for k, v in phases.items()},
        "kmeans": {k: rounded(v) for k, v in kmeans.items()},
        "crops_files": [os.path.relpath(p, a.data) for p in paths[: len(crops)]] if a.crops_out else [],
        "data_phase_repeats": a.repeats,
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
        "versions": versions(),
    }
    with open(a.json_out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"  wrote {a.json_out}, {a.features_out} ({features.shape[0]}x{features.shape[1]} float32)"
          + (f", {a.crops_out} ({len(crops)} crops)" if a.crops_out else ""))


if __name__ == "__main__":
    sys.exit(main())
