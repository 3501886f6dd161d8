#!/usr/bin/env python3
"""Writes a CIFAR-10 or MNIST dataset out as the two bring-your-own-data layouts ccq reads:
an image folder (`folder:`) and NumPy arrays (`npy:`). The same images through either
reader give the same accuracy as through `cifar10:` / `mnist:` (docs/DATA.md measures it),
and the README's worked example starts from such a folder.

    python3 scripts/to_own_data.py cifar10 ../shared/datasets/cifar10-jpeg/cifar-10-batches-bin \\
        --folder /tmp/cifar-png --npy /tmp/cifar-npy [--format png|jpg] [--limit N]
    python3 scripts/to_own_data.py mnist examples/data/mnist-10k --folder /tmp/digits

Folder: DIR/train/<class>/<index>.png and DIR/test/<class>/<index>.png; CIFAR-10's class
names come from batches.meta.txt (they sort in label order, so torchvision's numbering is
the original labels), MNIST's are the digits. Arrays: x_train.npy (N×H×W×C uint8, NHWC;
N×H×W for MNIST), y_train.npy (int64), x_test.npy, y_test.npy, records in file order.
Needs numpy and Pillow (pip install numpy pillow).
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image


def cifar10(root, split):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    raw = b"".join((root / n).read_bytes() for n in names)
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # NHWC
    meta = root / "batches.meta.txt"
    classes = [l.strip() for l in meta.read_text().splitlines() if l.strip()] if meta.exists() else None
    return np.ascontiguousarray(images), records[:, 0].astype(np.int64), classes


def idx(path):
    """An IDX file, raw or gzipped (MNIST's format)."""
    for p in [path, path.with_name(path.name + ".gz")]:
        if p.exists():
            data = p.read_bytes()
            return gzip.decompress(data) if p.suffix == ".gz" else data
    raise FileNotFoundError(path)


def mnist(root, split):
    prefix = "train" if split == "train" else "t10k"
    images = idx(root / f"{prefix}-images-idx3-ubyte")
    labels = idx(root / f"{prefix}-labels-idx1-ubyte")
    n, h, w = (int.from_bytes(images[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    x = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(n, h, w)
    y = np.frombuffer(labels, dtype=np.uint8, offset=8).astype(np.int64)
    return x, y, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["cifar10", "mnist"])
    ap.add_argument("source", type=Path, help="the cifar-10-batches-bin directory, or the MNIST IDX directory")
    ap.add_argument("--folder", type=Path, help="write an image folder here")
    ap.add_argument("--npy", type=Path, help="write NumPy arrays here")
    ap.add_argument("--format", choices=["png", "jpg"], default="png", help="image files (png is lossless)")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality")
    ap.add_argument("--limit", type=int, default=0, help="only the first N records of each split")
    args = ap.parse_args()

    read = cifar10 if args.kind == "cifar10" else mnist
    for split in ["train", "test"]:
        images, labels, classes = read(args.source, split)
        if args.limit:
            images, labels = images[: args.limit], labels[: args.limit]
        classes = classes or [str(c) for c in range(int(labels.max()) + 1)]
        assert classes == sorted(classes), "class names must sort in label order"
        if args.npy:
            args.npy.mkdir(parents=True, exist_ok=True)
            np.save(args.npy / f"x_{split}.npy", images)
            np.save(args.npy / f"y_{split}.npy", labels)
        if args.folder:
            for c in classes:
                (args.folder / split / c).mkdir(parents=True, exist_ok=True)
            for i, (img, label) in enumerate(zip(images, labels)):
                path = args.folder / split / classes[label] / f"{i:05d}.{args.format}"
                Image.fromarray(img).save(path, **({"quality": args.quality} if args.format == "jpg" else {}))
        print(f"{split}: {len(labels)} images")


if __name__ == "__main__":
    main()
