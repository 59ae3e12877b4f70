"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzipped), read with numpy only."""
from __future__ import annotations

import gzip
import os

import numpy as np

DATA_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/ format, optionally .gz) as a numpy array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e}); reinstall it (`apt-get install --reinstall "
                         f"dataset-fashion-mnist`) or pass another file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} "
                         f"bytes; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str, data_dir: str = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of split 'train' (60,000) or 'test' (10,000)."""
    if split not in FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    paths = [os.path.join(data_dir, name) for name in FILES[split]]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: install Fashion-MNIST with "
                                    f"`apt-get install dataset-fashion-mnist`")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{paths[0]} / {paths[1]}: expected images [N, 28, 28] and labels [N], got "
                         f"{images.shape} and {labels.shape}")
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)
