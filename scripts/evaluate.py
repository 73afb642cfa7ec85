#!/usr/bin/env python3
"""Evaluate distilled datasets the way the MGD3 paper does: train a network from scratch on each
distilled ImageFolder, test it on a real validation ImageFolder, report mean +- std over the sets.

Protocols (README, "Look and judge: report, evaluation, FID"):

  hard  (paper 5.2; IDC / MinimaxDiffusion train.py)  ImageNette, ImageWoof, ImageIDC, ImageNet-100.
        ConvNet-6 (width 128) / ResNetAP-10 / ResNet-18, all with instance norm (GroupNorm with one
        group per channel). Train: Resize -> CenterCrop -> RandomResizedCrop(scale 0.5-1) -> flip ->
        ColorJitter(0.4, 0.4, 0.4) -> Lighting(0.1) -> ImageNet normalisation, CutMix with
        probability 1 and beta 1. SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64
        (more than 100 classes: lr 0.1, weight decay 1e-4, batch 128), MultiStepLR at 2E/3 and 5E/6
        with gamma 0.2, E = the code's ipc_epoch (IPC <= 10: 2000, <= 50: 1500, else 1000; x2/3
        rounded down to 100s for 100 classes). The first IPC files per class in sorted order. Test:
        Resize + CenterCrop. The number is the best top-1 over evaluations every E/100 epochs; the
        training seed is 0 for every set, the sets differ (distil them with seeds 0, 1, 2).

  soft  (paper 5.3; RDED)  ImageNet-1K. Student ResNet-18 (batch norm, torchvision), teacher given by
        --teacher (a torchvision ResNet-18 state dict or whole model saved with torch.save).
        Knowledge distillation at temperature 20 on teacher outputs computed for each augmented
        batch (whole-image crops: RDED's multi-patch stitching is not applied), RandomResizedCrop
        (scale 0.08-1), flip, CutMix (alpha 1); AdamW lr 1e-3, weight decay 0.01, cosine schedule,
        300 epochs, batch 100 (IPC <= 10) or 200. The number is the top-1 after the last epoch.

--train takes ImageFolders, mgd3 job folders (<output>/jobs/<job>) or, with --store, job ids. mgd3
sets must be seeds of one experiment: jobs that differ in anything but the seed, the same seed twice
and unfinished jobs are refused before any training.

--sweep takes an mgd3 sweep (its record <output>/sweeps/<sweep>.json, or its id with --store <output>)
and evaluates every finished variant with the one protocol given, one set each: a table with the
swept settings as columns (and the same as JSON with --out). Each variant's result is kept under
<output>/sweeps/<sweep>/eval/<protocol settings>/<job>.json as soon as it is known (the settings
include a digest of the validation folder's files and the teacher, so another --val or --teacher
trains again), so running the same command again after an interruption trains only the variants
still missing. Variants that have
not finished are listed and left out.

--quick (2 epochs) or --epochs N for smoke runs. Progress with an ETA goes to stderr; the result is
printed and written as JSON with --out. Small grey images (the Fashion-MNIST demo) are read as RGB
(three equal channels) at --size 32, and ConvNet's depth is capped so that at least 2x2 pixels
remain (depth 4 at 32 px): say so when quoting such numbers.

Examples:
  python scripts/evaluate.py hard --net resnet_ap10 --val /data/imagenette/val \\
      --train out/nette/jobs/nette-s0/dataset out/nette/jobs/nette-s1/dataset out/nette/jobs/nette-s2/dataset
  python scripts/evaluate.py soft --teacher resnet18_imagenet.pth --val /data/imagenet/val \\
      --train out/in1k/jobs/in1k-s0/dataset
  python scripts/evaluate.py hard --net convnet6 --size 32 --quick --val data/fashion-mnist/test \\
      --train out/fashion-mnist/jobs/<job>
  python scripts/evaluate.py hard --net convnet6 --size 32 --epochs 50 --val data/fashion-mnist/test \\
      --sweep out/fashion-mnist/sweeps/<sweep>.json
"""

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets, models, transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# AlexNet-style PCA lighting noise, ImageNet's eigenvalues and eigenvectors (as IDC uses them).
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


class Lighting:
    """Adds PCA-based colour noise of standard deviation `alphastd` (IDC's Lighting(0.1))."""

    def __init__(self, alphastd):
        self.alphastd = alphastd

    def __call__(self, img):
        if self.alphastd == 0:
            return img
        alpha = img.new_empty(3).normal_(0, self.alphastd)
        rgb = (EIGVEC * alpha.view(1, 3) * EIGVAL.view(1, 3)).sum(1)
        return img + rgb.view(3, 1, 1)


def instance_norm(channels):
    return nn.GroupNorm(channels, channels, affine=True)


class ConvNet(nn.Module):
    """IDC's ConvNet: depth x (conv3x3 width -> instance norm -> ReLU -> 2x2 average pool) -> linear."""

    def __init__(self, classes, size, depth=6, width=128):
        super().__init__()
        layers, channels = [], 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), instance_norm(width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels = width
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BlockAP(nn.Module):
    """A basic residual block that downsamples by average pooling instead of a strided conv."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.n1 = instance_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = instance_norm(cout)
        self.pool = nn.AvgPool2d(2) if stride == 2 else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), instance_norm(cout), nn.AvgPool2d(2) if stride == 2 else nn.Identity()
            )

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.pool(out)
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetAP10(nn.Module):
    """IDC's ResNetAP-10: four stages of one BlockAP each (64, 128, 256, 512 channels)."""

    def __init__(self, classes, size):
        super().__init__()
        stem = [nn.Conv2d(3, 64, 3, padding=1, bias=False), instance_norm(64), nn.ReLU(inplace=True)]
        if size >= 128:  # ImageNet resolution: 7x7 conv and 2x2 pooling twice, as IDC's ImageNet stem
            stem = [nn.Conv2d(3, 64, 7, padding=3, bias=False), instance_norm(64), nn.ReLU(inplace=True),
                    nn.AvgPool2d(2), nn.AvgPool2d(2)]
        self.stem = nn.Sequential(*stem)
        stages, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(BlockAP(cin, cout, stride))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def network(name, classes, size, norm="instance"):
    if name == "convnet6":
        depth = 6
        while depth > 1 and size // (2 ** depth) < 2:
            depth -= 1
        if depth < 6:
            print(f"note: ConvNet depth {depth} instead of 6 at {size} px", file=sys.stderr)
        return ConvNet(classes, size, depth=depth)
    if name == "resnet_ap10":
        return ResNetAP10(classes, size)
    if name == "resnet18":
        norm_layer = instance_norm if norm == "instance" else nn.BatchNorm2d
        return models.resnet18(num_classes=classes, norm_layer=norm_layer)
    raise SystemExit(f"unknown network `{name}`: use convnet6, resnet_ap10 or resnet18")


def ipc_epoch(ipc, classes):
    """The code's epoch budget (IDC / MinimaxDiffusion argument.py)."""
    epochs = 2000 if ipc <= 10 else 1500 if ipc <= 50 else 1000
    if classes == 100:
        epochs = int(epochs * 2 / 3) // 100 * 100
    return epochs


def first_per_class(folder, ipc):
    """Keeps the first `ipc` files of each class in sorted order (IDC's `slct_type random`)."""
    kept, counts = [], {}
    for path, label in sorted(folder.samples):
        if counts.get(label, 0) < ipc:
            kept.append((path, label))
            counts[label] = counts.get(label, 0) + 1
    folder.samples = folder.imgs = kept
    folder.targets = [label for _, label in kept]
    return folder


class InMemory(torch.utils.data.Dataset):
    """The training images decoded once and held in memory (IDC holds them too); the transform
    runs per epoch."""

    def __init__(self, folder, transform):
        self.items = [(folder.loader(path).convert("RGB"), label) for path, label in folder.samples]
        self.transform = transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, label = self.items[i]
        return self.transform(image), label


def cutmix(x, beta, generator):
    """Pastes a box of a shuffled batch into `x`; returns (images, permutation, weight of x)."""
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(beta, beta))
    index = torch.randperm(x.size(0), generator=generator)
    h, w = x.size(2), x.size(3)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (1,), generator=generator)), int(torch.randint(0, w, (1,), generator=generator))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[index, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, index, lam


def evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device))
            correct += (out.argmax(1).cpu() == y).sum().item()
            total += y.numel()
    model.train()
    return 100.0 * correct / max(total, 1)


class Progress:
    """A line to stderr at most every few seconds, with an ETA from the epochs done so far."""

    def __init__(self, label, epochs):
        self.label, self.epochs, self.started, self.shown = label, epochs, time.time(), 0.0

    def __call__(self, epoch, loss, note="", force=False):
        now = time.time()
        if not force and now - self.shown < 5:
            return
        self.shown = now
        done = epoch + 1
        eta = (now - self.started) / done * (self.epochs - done)
        print(f"{self.label}: epoch {done}/{self.epochs}, loss {loss:.3f}{note}, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def seeded(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def checked_ipc(args, train_dir, folder, counts):
    """The IPC to train with: --ipc, or the smallest class; never more images than a class has."""
    if args.ipc and args.ipc > counts.min():
        short = folder.classes[int(counts.argmin())]
        raise SystemExit(f"--ipc {args.ipc}: class `{short}` of `{train_dir}` has only {int(counts.min())} image(s)")
    return args.ipc or int(counts.min())


def image_folder(path, what, **options):
    """torchvision's ImageFolder, or a sentence naming the folder when it is none (a class folder
    given for its root, an empty folder, a missing one) instead of a traceback."""
    try:
        return datasets.ImageFolder(path, **options)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"{what} `{path}` is no ImageFolder ({error}): give the folder that holds one folder per "
                         "class (a distilled set: <output>/jobs/<job>/dataset, or the job folder itself)")


def loaders(args, train_dir, size):
    train_folder = image_folder(train_dir, "the distilled set")
    val = image_folder(args.val, "--val", transform=transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    if train_folder.classes != val.classes:
        missing = sorted(set(train_folder.classes) ^ set(val.classes))
        raise SystemExit(f"{train_dir} and {args.val} name different classes (e.g. {missing[:5]}): "
                         "the validation folder must hold exactly the distilled classes")
    if args.val_limit:
        val.samples = val.samples[:: max(1, len(val.samples) // args.val_limit)]
    return train_folder, val


def run_hard(args, train_dir, device):
    size = args.size
    train_transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.4, 0.4, 0.4), Lighting(0.1), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folder, val = loaders(args, train_dir, size)
    classes = len(folder.classes)
    counts = np.bincount(folder.targets, minlength=classes)
    ipc = checked_ipc(args, train_dir, folder, counts)
    first_per_class(folder, ipc)
    epochs = args.epochs or (2 if args.quick else ipc_epoch(ipc, classes))
    generator = seeded(args.train_seed)
    many = classes > 100
    batch = 128 if many else 64
    data = torch.utils.data.DataLoader(InMemory(folder, train_transform), batch_size=batch, shuffle=True,
                                       generator=generator, num_workers=0, drop_last=False)
    test = torch.utils.data.DataLoader(val, batch_size=256, shuffle=False, num_workers=args.workers)
    model = network(args.net, classes, size, args.norm).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1 if many else 0.01, momentum=0.9,
                                weight_decay=1e-4 if many else 5e-4)
    milestones = [2 * epochs // 3, 5 * epochs // 6]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.2)
    every = max(1, epochs // 100)
    best, evaluations = 0.0, []
    progress = Progress(os.path.basename(os.path.dirname(train_dir.rstrip("/"))) or train_dir, epochs)
    for epoch in range(epochs):
        total = 0.0
        for x, y in data:
            x, y = x.to(device), y.to(device)
            mixed, index, lam = cutmix(x, 1.0, generator)
            out = model(mixed)
            loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[index.to(device)])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        schedule.step()
        last = epoch + 1 == epochs
        if (epoch + 1) % every == 0 or last:
            top1 = evaluate(model, test, device)
            best = max(best, top1)
            evaluations.append({"epoch": epoch + 1, "top1": top1})
            progress(epoch, total / max(len(data), 1), f", top-1 {top1:.2f} (best {best:.2f})", force=last)
        else:
            progress(epoch, total / max(len(data), 1))
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    return {"train": train_dir, "ipc": ipc, "classes": classes, "epochs": epochs, "top1": best,
            "val_images": len(val), "evaluations": evaluations}


def run_soft(args, train_dir, device):
    size = args.size
    if not args.teacher:
        raise SystemExit("the soft-label protocol needs --teacher: a ResNet-18 checkpoint trained on the full data")
    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    folder, val = loaders(args, train_dir, size)
    classes = len(folder.classes)
    counts = np.bincount(folder.targets, minlength=classes)
    ipc = checked_ipc(args, train_dir, folder, counts)
    first_per_class(folder, ipc)
    epochs = args.epochs or (2 if args.quick else 300)
    generator = seeded(args.train_seed)
    teacher = models.resnet18(num_classes=classes)
    try:
        loaded = torch.load(args.teacher, map_location="cpu", weights_only=False)
        if isinstance(loaded, nn.Module):
            teacher = loaded
        else:
            state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
            teacher.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except Exception as error:  # a file that is no ResNet-18 checkpoint, whatever torch says
        raise SystemExit(f"--teacher `{args.teacher}` is not a ResNet-18 checkpoint of {classes} classes "
                         f"(a state dict or a model saved with torch.save): {str(error).splitlines()[0]}")
    teacher.to(device).eval()
    student = models.resnet18(num_classes=classes).to(device)
    batch = 100 if ipc <= 10 else 200
    data = torch.utils.data.DataLoader(InMemory(folder, train_transform), batch_size=batch, shuffle=True,
                                       generator=generator, num_workers=0)
    test = torch.utils.data.DataLoader(val, batch_size=256, shuffle=False, num_workers=args.workers)
    optimiser = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    temperature = 20.0
    progress = Progress(os.path.basename(os.path.dirname(train_dir.rstrip("/"))) or train_dir, epochs)
    for epoch in range(epochs):
        total = 0.0
        for x, _ in data:
            x = x.to(device)
            mixed, _, _ = cutmix(x, 1.0, generator)
            with torch.no_grad():
                soft = F.softmax(teacher(mixed) / temperature, dim=1)
            out = F.log_softmax(student(mixed) / temperature, dim=1)
            loss = F.kl_div(out, soft, reduction="batchmean") * temperature * temperature
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        schedule.step()
        progress(epoch, total / max(len(data), 1), force=epoch + 1 == epochs)
    top1 = evaluate(student, test, device)
    print(f"top-1 {top1:.2f}", file=sys.stderr)
    return {"train": train_dir, "ipc": ipc, "classes": classes, "epochs": epochs, "top1": top1,
            "val_images": len(val)}


# Settings that may differ between the sets of one experiment: the seed (that is the point) and
# what only names or places a job.
PER_SET_SETTINGS = {"seed", "name", "output", "latent_cache", "classes_per_shard", "lease_timeout_s",
                    "max_attempts", "contact_sheet"}


def resolve_train(path, store):
    """The ImageFolder of one --train entry: an ImageFolder as it is, an mgd3 job folder's dataset/,
    or a job id's <store>/jobs/<id>/dataset."""
    if not os.path.exists(path) and store and os.sep not in path:
        path = os.path.join(store, "jobs", path)
    if os.path.isdir(os.path.join(path, "dataset")) and os.path.isdir(os.path.join(path, "shards")):
        path = os.path.join(path, "dataset")
    if not os.path.isdir(path):
        hint = "" if store else " (a job id needs --store <output folder>)"
        raise SystemExit(f"--train `{path}` is not a folder: give ImageFolder roots, mgd3 job folders or job ids{hint}")
    return path


def job_of(dataset):
    """The manifest of the mgd3 job an ImageFolder belongs to (<job>/dataset), or None for another
    ImageFolder. An unfinished mgd3 job (no manifest.json yet) is refused: its set is incomplete."""
    job = os.path.dirname(os.path.normpath(dataset))
    if not os.path.isdir(os.path.join(job, "shards")):
        return None
    manifest = os.path.join(job, "manifest.json")
    if not os.path.isfile(manifest):
        raise SystemExit(f"--train `{dataset}`: job `{os.path.basename(job)}` has not succeeded (no manifest.json: it runs, failed or was cancelled): "
                         "evaluate finished jobs only (`coordinator status` says how far it is)")
    with open(manifest) as f:
        manifest = json.load(f)
    refuse_other_job(os.path.basename(job), manifest, f"--train `{dataset}`")
    refuse_damaged(dataset, manifest, f"--train `{dataset}`")
    return manifest


def refuse_other_job(folder_job, manifest, what, variant=None):
    """Exits when the manifest in jobs/<folder_job>/ is another job's (folders swapped, renamed or
    copied) or, for a sweep's variant, when the sweep's record gives the job other settings than the
    job's own spec: a score must never be shown under another job's name or settings."""
    if manifest.get("job_id") != folder_job:
        raise SystemExit(f"{what}: the folder jobs/{folder_job} holds job {manifest.get('job_id')}'s manifest.json "
                         "(folders swapped, renamed or copied): put each job's folder back under its own id")
    if variant is None:
        return
    if variant.get("fingerprint") and variant["fingerprint"] != manifest.get("fingerprint"):
        raise SystemExit(f"{what}: the sweep's record gives job {folder_job} another fingerprint than its manifest: "
                         "the record was edited or is another sweep's")
    spec = manifest.get("spec", {})
    for key, value in variant.get("settings", {}).items():
        ran = spec.get(key, spec.get("sampling", {}).get(key))
        if ran is None:
            continue
        try:
            same = float(ran) == float(value)
        except (TypeError, ValueError):
            same = str(ran) == str(value)
        if not same:
            raise SystemExit(f"{what}: the sweep's record says {key} = {value}, job {folder_job}'s spec {ran}: the "
                             "record was edited or is another sweep's; its scores would be shown under the wrong "
                             "settings")


def set_problems(dataset, manifest):
    """What in an mgd3 job's ImageFolder differs from its manifest: a listed image missing, of
    another size or other bytes (its sha256), or a file the manifest does not list (ImageFolder
    would train on it too)."""
    problems, listed = [], set()
    for cls in manifest["classes"]:
        for image in cls["images"]:
            relative = os.path.join(cls["wnid"], image["name"])
            listed.add(relative)
            path = os.path.join(dataset, relative)
            if not os.path.isfile(path):
                problems.append(f"{relative}: missing")
                continue
            size = os.path.getsize(path)
            if size != image["bytes"]:
                problems.append(f"{relative}: {size} bytes, the manifest says {image['bytes']}")
                continue
            with open(path, "rb") as f:
                digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
            if digest != image["sha256"]:
                problems.append(f"{relative}: other bytes than the manifest's (changed in place)")
    for folder, subfolders, files in os.walk(dataset, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            relative = os.path.relpath(os.path.join(folder, name), dataset)
            if relative not in listed:
                problems.append(f"{relative}: not in the manifest")
    return problems


def refuse_damaged(dataset, manifest, what):
    """Exits naming the first problems when an mgd3 job's ImageFolder does not match its manifest:
    a score of a damaged set would be reported as the job's."""
    problems = set_problems(dataset, manifest)
    if problems:
        job = manifest["job_id"]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise SystemExit(f"{what}: job {job}'s images do not match its manifest.json ({shown}): the score would not be "
                         f"the job's. `coordinator verify {job}` names every problem and `coordinator resume {job}` "
                         "puts the job's own bytes back")


def set_digest(manifest):
    """12 hex digits naming a job's distilled set by its images' names, labels and sha256s (not
    its timestamps): a result kept for one set is never shown for another, such as the same job
    distilled again from changed data."""
    digest = hashlib.sha256()
    for cls in manifest["classes"]:
        digest.update(f"{cls['wnid']}\0{cls.get('label')}\n".encode())
        for image in cls["images"]:
            digest.update(f"{image['name']}\0{image['sha256']}\n".encode())
    return digest.hexdigest()[:12]


def check_sets(train):
    """The manifests of the --train sets (None for plain ImageFolders), after refusing sets that are
    not seeds of one experiment: other data, classes, IPC, sampling or models (named), or the same
    job twice. Prints which job and seed each set is."""
    jobs = [job_of(path) for path in train]
    found = [(path, job) for path, job in zip(train, jobs) if job is not None]
    if not found:
        return jobs
    first_path, first = found[0]
    for path, job in found[1:]:
        keys = sorted(set(first["spec"]) | set(job["spec"]))
        differ = [k for k in keys if k not in PER_SET_SETTINGS and first["spec"].get(k) != job["spec"].get(k)]
        if first["model_fingerprints"] != job["model_fingerprints"]:
            differ.append("models (fingerprints)")
        if differ:
            shown = "; ".join(f"`{k}`: {json.dumps(first['spec'].get(k))} vs {json.dumps(job['spec'].get(k))}"
                              for k in differ if k in first["spec"] or k in job["spec"]) or ", ".join(differ)
            raise SystemExit(f"--train `{first_path}` and `{path}` are not seeds of one experiment (jobs "
                             f"{first['job_id']} and {job['job_id']}): {shown}; give only sets that differ by "
                             "their seed (evaluate the others in another run)")
    seen = {}
    for path, job in found:
        seed = job["spec"].get("seed")
        if seed in seen:
            raise SystemExit(f"--train `{seen[seed]}` and `{path}` are both distilled with seed {seed} "
                             f"({job['job_id']}): the same set twice would understate the spread")
        seen[seed] = path
    for path, job in found:
        print(f"set {path}: job {job['job_id']}, distillation seed {job['spec'].get('seed')}, "
              f"IPC {job['spec'].get('ipc')}", file=sys.stderr)
    return jobs


def sweep_record(sweep, store):
    """The record of an mgd3 sweep and the output folder its variants are in: a path to
    <output>/sweeps/<sweep>.json, or a sweep id with --store <output>."""
    path = sweep
    if not os.path.isfile(path) and store:
        path = os.path.join(store, "sweeps", sweep + ".json")
    if not os.path.isfile(path):
        hint = "" if store else " (a sweep id needs --store <output folder>)"
        raise SystemExit(f"--sweep `{sweep}` is neither a sweep record (<output>/sweeps/<sweep>.json) nor a sweep id "
                         f"in the store{hint}")
    with open(path) as f:
        record = json.load(f)
    if "variants" not in record or "sweep_id" not in record:
        raise SystemExit(f"--sweep `{path}` is not an mgd3 sweep record (no `variants`)")
    return record, os.path.dirname(os.path.dirname(os.path.abspath(path)))


def inputs_digest(args):
    """12 hex digits naming the inputs of an evaluation besides the distilled set: the validation
    folder (where it is, and every file's path and contents in it) and, for the soft protocol, the
    teacher's bytes. Results kept for one validation set or teacher are never shown for another,
    nor for the same names and sizes with other pictures (ImageNet's 50,000 validation images hash
    in seconds; training takes hours)."""
    digest = hashlib.sha256()
    val = os.path.realpath(args.val)
    digest.update(val.encode() + b"\0")
    # As torchvision's ImageFolder walks it (links to folders followed).
    for folder, subfolders, files in os.walk(val, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(path, val)}\0".encode())
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(hashlib.file_digest(f, "sha256").digest())
            digest.update(b"\n")
    if args.protocol == "soft" and args.teacher:
        digest.update(b"teacher\0")
        with open(args.teacher, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:12]


def protocol_key(args):
    """What makes two evaluations of one set the same: the folder name results are kept under
    (the settings, readable, then the digest of the validation set and teacher)."""
    epochs = args.epochs or ("quick" if args.quick else "paper")
    parts = [args.protocol, args.net if args.protocol == "hard" else "resnet18", f"size{args.size}",
             f"epochs-{epochs}", f"seed{args.train_seed}", f"ipc-{args.ipc or 'all'}", f"val{args.val_limit or 'all'}",
             args.norm if args.protocol == "hard" else os.path.basename(args.teacher or ""),
             f"inputs-{inputs_digest(args)}"]
    return "-".join(str(p) for p in parts)


def run_sweep(args, device):
    """Every finished variant of a sweep evaluated with one protocol, resumable per variant; prints a
    table with the swept settings as columns and returns the result."""
    record, root = sweep_record(args.sweep, args.store)
    keys = record["keys"]
    kept = os.path.join(root, "sweeps", record["sweep_id"], "eval", protocol_key(args))
    os.makedirs(kept, exist_ok=True)
    rows, left_out = [], []
    variants = record["variants"]
    for i, variant in enumerate(variants):
        job = variant["job_id"]
        label = " ".join(f"{k}={variant['settings'].get(k, '')}" for k in keys)
        dataset = os.path.join(root, "jobs", job, "dataset")
        manifest_path = os.path.join(root, "jobs", job, "manifest.json")
        if not os.path.isdir(os.path.join(root, "jobs", job)):
            raise SystemExit(f"variant {i + 1}/{len(variants)} ({label}): job {job}'s folder {os.path.join(root, 'jobs', job)} "
                             "is missing (moved or deleted): put it back, or evaluate the other jobs with --train")
        if not os.path.isfile(manifest_path):
            left_out.append(f"{job} ({label})")
            print(f"variant {i + 1}/{len(variants)} ({label}): job {job} has not succeeded (no manifest.json): left out", file=sys.stderr)
            continue
        with open(manifest_path) as f:
            manifest = json.load(f)
        refuse_other_job(job, manifest, f"variant {i + 1} ({label})", variant)
        refuse_damaged(dataset, manifest, f"variant {i + 1} ({label})")
        digest = set_digest(manifest)
        done = os.path.join(kept, job + ".json")
        run = None
        if os.path.isfile(done):
            with open(done) as f:
                run = json.load(f)
            if run.get("set_digest") != digest:
                print(f"variant {i + 1}/{len(variants)} ({label}): its images changed since the result kept for it "
                      "(distilled again): training again", file=sys.stderr)
                run = None
            else:
                print(f"variant {i + 1}/{len(variants)} ({label}): top-1 {run['top1']:.2f} (kept from an earlier "
                      "run)", file=sys.stderr)
        if run is None:
            print(f"variant {i + 1}/{len(variants)} ({label}): training on {dataset}", file=sys.stderr)
            run = run_hard(args, dataset, device) if args.protocol == "hard" else run_soft(args, dataset, device)
            run["job_id"] = job
            run["set_digest"] = digest
            with open(done + ".tmp", "w") as f:
                json.dump(run, f, indent=2)
            os.replace(done + ".tmp", done)
        rows.append({"settings": variant["settings"], "job_id": job, "top1": run["top1"], "run": run})
    if not rows:
        raise SystemExit(f"no variant of sweep {record['sweep_id']} has finished: nothing to evaluate")
    header = "| " + " | ".join(keys + ["top-1 (%)", "job"]) + " |"
    print(header)
    print("|" + "---|" * (len(keys) + 2))
    for row in rows:
        cells = [str(row["settings"].get(k, "")) for k in keys] + [f"{row['top1']:.2f}", row["job_id"]]
        print("| " + " | ".join(cells) + " |")
    if left_out:
        print(f"not finished, left out: {'; '.join(left_out)}", file=sys.stderr)
    settings = seed_summary(keys, rows)
    return {"sweep_id": record["sweep_id"], "keys": keys, "protocol": args.protocol,
            "network": args.net if args.protocol == "hard" else "resnet18", "size": args.size, "device": str(device),
            "train_seed": args.train_seed, "val": args.val, "variants": rows, "left_out": left_out,
            "over_seeds": settings}


def seed_summary(keys, rows):
    """For a sweep over `seed` (distillation seeds): mean ± sample std of top-1 over the seeds of
    each setting of the other keys, printed as a second table (the paper's numbers are such means)
    and returned; None for a sweep without `seed`."""
    if "seed" not in keys:
        return None
    others = [k for k in keys if k != "seed"]
    groups = {}
    for row in rows:
        setting = tuple(str(row["settings"].get(k, "")) for k in others)
        groups.setdefault(setting, []).append(row)
    summary = []
    print()
    print("| " + " | ".join(others + ["top-1 (%) over seeds", "seeds"]) + " |")
    print("|" + "---|" * (len(others) + 2))
    for setting, group in groups.items():
        tops = [r["top1"] for r in group]
        seeds = [str(r["settings"].get("seed", "")) for r in group]
        mean = statistics.fmean(tops)
        std = statistics.stdev(tops) if len(tops) > 1 else None
        shown = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (one seed: no spread)"
        print("| " + " | ".join(list(setting) + [shown, ", ".join(seeds)]) + " |")
        summary.append({"settings": dict(zip(others, setting)), "seeds": seeds, "top1_mean": mean, "top1_std": std})
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("protocol", choices=["hard", "soft"], help="hard labels (5.2) or soft labels with a teacher (5.3)")
    parser.add_argument("--sweep", help="an mgd3 sweep: <output>/sweeps/<sweep>.json, or its id with --store; every "
                                        "finished variant is evaluated, one set each")
    parser.add_argument("--train", nargs="+",
                        help="the distilled sets, one per distillation seed of one experiment: ImageFolders, mgd3 job "
                             "folders (<output>/jobs/<job>) or, with --store, job ids")
    parser.add_argument("--store", help="the output folder holding jobs/<job>/ (for job ids in --train)")
    parser.add_argument("--val", required=True, help="real validation ImageFolder with the same class folders")
    parser.add_argument("--net", default="resnet_ap10", help="convnet6, resnet_ap10 or resnet18 (hard protocol)")
    parser.add_argument("--norm", choices=["instance", "batch"], default="instance",
                        help="ResNet-18's norm layers in the hard protocol (instance, as IDC; batch to train a teacher)")
    parser.add_argument("--teacher", help="ResNet-18 checkpoint (soft protocol)")
    parser.add_argument("--size", type=int, default=224, help="input size in pixels (224 for ImageNet)")
    parser.add_argument("--ipc", type=int, help="images per class to use (default: all the folders hold)")
    parser.add_argument("--epochs", type=int, help="override the protocol's epochs")
    parser.add_argument("--quick", action="store_true", help="2 epochs: a smoke run")
    parser.add_argument("--train-seed", type=int, default=0, help="the training seed (0 in the paper)")
    parser.add_argument("--val-limit", type=int, help="test on about this many validation images (smoke runs)")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes for the validation set")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--save-model", help="save the (last) trained model's state dict here")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this PyTorch sees no CUDA GPU (use --device cpu, or auto)")
    if args.sweep and args.train:
        raise SystemExit("--train and --sweep exclude each other: evaluate a sweep's variants (--sweep) or sets of "
                         "one experiment (--train)")
    if not args.sweep and not args.train:
        raise SystemExit("give the sets to evaluate: --train (sets of one experiment) or --sweep (a sweep's variants)")
    for flag, value, least in [("--epochs", args.epochs, 1), ("--size", args.size, 8), ("--ipc", args.ipc, 1),
                               ("--val-limit", args.val_limit, 1), ("--workers", args.workers, 0),
                               ("--threads", args.threads, 1)]:
        if value is not None and value < least:
            raise SystemExit(f"{flag} {value}: give a whole number of at least {least}")
    if args.train_seed < 0 or args.train_seed >= 2 ** 32:
        raise SystemExit(f"--train-seed {args.train_seed}: give a whole number from 0 to 4294967295")
    # Files written after hours of training are checked before it.
    for flag, target in [("--out", args.out), ("--save-model", args.save_model)]:
        if not target:
            continue
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise SystemExit(f"{flag} `{target}`: {folder} is not a folder this process may write in")
        if os.path.isdir(target):
            raise SystemExit(f"{flag} `{target}` is a folder: name the file to write")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isdir(args.val):
        raise SystemExit(f"--val `{args.val}` is not a folder: give an ImageFolder root (one sub-folder per class)")
    if args.sweep:
        result = run_sweep(args, device)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return
    args.train = [resolve_train(path, args.store) for path in args.train]
    jobs = check_sets(args.train)
    runs = []
    for train_dir, job in zip(args.train, jobs):
        run = run_hard(args, train_dir, device) if args.protocol == "hard" else run_soft(args, train_dir, device)
        if job is not None:
            run["job_id"], run["distillation_seed"] = job["job_id"], job["spec"].get("seed")
        runs.append(run)
    tops = [r["top1"] for r in runs]
    result = {
        "protocol": args.protocol,
        "network": args.net if args.protocol == "hard" else "resnet18",
        "size": args.size,
        "device": str(device),
        "train_seed": args.train_seed,
        "runs": runs,
        "val": args.val,
        "val_images": runs[0]["val_images"],
        "top1_mean": statistics.fmean(tops),
        "top1_std": statistics.stdev(tops) if len(tops) > 1 else None,
    }
    spread = f"± {result['top1_std']:.2f}" if result["top1_std"] is not None else "(one set: no spread)"
    seeds = [r.get("distillation_seed") for r in runs]
    named = f", distillation seeds {', '.join(str(s) for s in seeds)}" if all(s is not None for s in seeds) else ""
    print(f"top-1 {result['top1_mean']:.2f} {spread} over {len(tops)} set(s) "
          f"({result['protocol']} labels, {result['network']}, {runs[0]['epochs']} epochs{named})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Results kept per variant stay; running the same command again goes on from them.
        print("interrupted; run the same command again to go on (with --sweep, each finished variant's result "
              "is kept)", file=sys.stderr)
        sys.exit(130)
