#!/usr/bin/env python3
"""scikit-learn's k-means inertia on a fixed point set, for worker/tests/kmeans_reference.rs.

    (cd /tmp && /tmp/venv/bin/python /work/main/scripts/kmeans_reference.py --root /work/main)

Writes tests/fixtures/kmeans/features.npy (f32 [1300, 64]: an imbalanced mixture of 30 anisotropic
Gaussian clusters, numpy default_rng(2025), the shape of one ImageNet class's images at a reduced
latent size) and tests/fixtures/kmeans/sklearn.json: for k in {10, 50, 100}, the inertia (sum of
squared distances to the nearest centre, float64) of sklearn.cluster.KMeans(n_clusters=k,
n_init="auto", random_state=seed).fit on float64 features for seeds 0..9 — the reference code's
k-means (one greedy k-means++ seeding, at most 300 Lloyd iterations, tol 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import sklearn
from sklearn.cluster import KMeans

POINTS, DIM, CLUSTERS, SEEDS, KS = 1300, 64, 30, range(40), (10, 50, 100)


def features() -> np.ndarray:
    rng = np.random.default_rng(2025)
    weights = rng.dirichlet(np.full(CLUSTERS, 0.7))
    sizes = np.maximum(1, np.round(weights * POINTS).astype(int))
    sizes[np.argmax(sizes)] += POINTS - sizes.sum()
    parts = []
    for c, size in enumerate(sizes):
        centre = rng.normal(0.0, 1.0, DIM)
        scale = rng.uniform(0.3, 1.5, DIM)
        parts.append(centre + rng.normal(0.0, 1.0, (size, DIM)) * scale)
    x = np.concatenate(parts).astype(np.float32)
    return x[rng.permutation(len(x))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    a = ap.parse_args()
    out = os.path.join(a.root, "tests", "fixtures", "kmeans")
    os.makedirs(out, exist_ok=True)
    x = features()
    assert x.shape == (POINTS, DIM)
    np.save(os.path.join(out, "features.npy"), x)
    x64 = x.astype(np.float64)
    result = {"sklearn": sklearn.__version__, "points": POINTS, "dim": DIM, "seeds": list(SEEDS), "inertia": {}}
    for k in KS:
        inertia = []
        for seed in SEEDS:
            km = KMeans(n_clusters=k, n_init="auto", random_state=seed).fit(x64)
            d = ((x64[:, None, :] - km.cluster_centers_[None, :, :]) ** 2).sum(-1).min(1)
            inertia.append(float(d.sum()))
        result["inertia"][str(k)] = inertia
        print(f"k={k}: mean inertia {np.mean(inertia):.1f} (seeds {inertia[0]:.1f} .. spread "
              f"{(max(inertia) - min(inertia)) / np.mean(inertia) * 100:.2f} %)")
    with open(os.path.join(out, "sklearn.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
