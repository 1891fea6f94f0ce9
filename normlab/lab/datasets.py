"""Data the lab runs on without a download, and the user's own.

* :func:`images`: scikit-learn's bundled digits (1,797 real handwritten digits, 8x8 pixels,
  10 classes), or the user's own images (an ``.npz`` with arrays ``x`` and ``y``, or a folder
  with one sub-folder of image files per class). A fixed stratified split into training and
  validation sets; pixels scaled by the training set's mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageData:
    """Float32 images ``(N, C, H, W)`` and int64 labels, split into train and validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    classes: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])


def images(data: str | None = None, val_fraction: float = 0.25, seed: int = 0) -> ImageData:
    """The bundled digits, or the user's images at ``data`` (``.npz`` or a class folder)."""
    if data is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, source = d.images.astype(np.float32)[:, None], d.target.astype(np.int64), \
            "scikit-learn digits (1,797 handwritten 8x8 digits)"
    else:
        x, y = _load_user_images(Path(data))
        source = str(data)
    return _split(x, y, val_fraction, seed, source)


def _load_user_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(f"no such data: {path}")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: give an .npz file (arrays x and y) or a folder of "
                             "class sub-folders of images")
        with np.load(path) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"{path}: the .npz must hold arrays 'x' (images) and 'y' "
                                 f"(integer labels); it holds {sorted(f.files)}")
            x, y = f["x"].astype(np.float32), f["y"]
        if x.ndim == 3:  # (N, H, W): one channel
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        if x.ndim != 4:
            raise ValueError(f"{path}: x must be (N, H, W), (N, C, H, W) or (N, H, W, C); "
                             f"got shape {x.shape}")
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y must hold one integer label per image; got "
                             f"{y.dtype} of shape {y.shape} for {x.shape[0]} images")
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise ValueError(f"{path}: x holds {bad} NaN or infinite values of {x.size}; the "
                             "images must be finite")
        classes, y = np.unique(y, return_inverse=True)  # any integer ids -> 0..K-1, in order
        if len(classes) < 2:
            raise ValueError(f"{path}: y must hold at least two classes; it holds only "
                             f"{classes.tolist()}")
        return x, y.reshape(-1).astype(np.int64)
    from PIL import Image

    classes = sorted(p for p in path.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, folder in enumerate(classes):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32))
                ys.append(label)
    if len(classes) < 2 or not xs:
        raise ValueError(f"{path}: expected at least two class sub-folders holding images")
    if len({a.shape for a in xs}) != 1:
        raise ValueError(f"{path}: all images must have one size; found "
                         f"{sorted({a.shape for a in xs})[:4]}")
    return np.stack(xs)[:, None], np.asarray(ys, np.int64)


def _split(x, y, val_fraction, seed, source) -> ImageData:
    from sklearn.model_selection import train_test_split

    xtr, xva, ytr, yva = train_test_split(x, y, test_size=val_fraction, random_state=seed,
                                          stratify=y)
    mean, std = xtr.mean(), xtr.std() + 1e-6
    t = lambda a: torch.from_numpy(np.ascontiguousarray((a - mean) / std, dtype=np.float32))
    return ImageData(t(xtr), torch.from_numpy(ytr), t(xva), torch.from_numpy(yva),
                     int(y.max()) + 1, source)
