"""Image folders for the image classifiers (ViT, Swin): ``ROOT/<class>/<image>``, one folder per class, as
torchvision's ``ImageFolder`` reads them, without depending on torchvision.

Binary PPM and PGM (netpbm) and ``.npy`` arrays decode with no extra package; PNG, JPEG and the other formats
Pillow reads decode when Pillow is installed (``pip install pillow``), and are refused otherwise, naming the
file. Each image is scaled to ``image_size`` square (bilinear), to ``channels`` channels, and normalised to
[-1, 1] (mean 0.5, std 0.5, as ViT's image processor does).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from galvatron_fx.errors import ConfigError

NETPBM = (".ppm", ".pgm")
PILLOW = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_netpbm(path: Path) -> np.ndarray:
    """A binary PPM (P6) or PGM (P5) image of 8-bit samples as an (H, W, C) uint8 array."""
    data = path.read_bytes()
    fields, position = [], 0
    while len(fields) < 4:  # magic, width, height, maxval, separated by whitespace and # comments
        while position < len(data) and data[position : position + 1].isspace():
            position += 1
        if data[position : position + 1] == b"#":
            position = data.index(b"\n", position) + 1
            continue
        end = position
        while end < len(data) and not data[end : end + 1].isspace():
            end += 1
        fields.append(data[position:end])
        position = end
    magic, width, height, maxval = fields[0], *(int(f) for f in fields[1:])
    channels = {b"P6": 3, b"P5": 1}.get(magic)
    if channels is None or maxval > 255:
        raise ConfigError(f"{path} is not a binary 8-bit PPM or PGM image", "convert it to P6/P5 with maxval 255")
    pixels = np.frombuffer(data, dtype=np.uint8, count=width * height * channels, offset=position + 1)
    return pixels.reshape(height, width, channels)


def _read(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix in NETPBM:
        return read_netpbm(path)
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return array[..., None] if array.ndim == 2 else array
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{path}: {suffix} images need Pillow, which is not installed",
            "pip install pillow, or convert the images to PPM/PGM or .npy",
        ) from None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class ImageFolder(torch.utils.data.Dataset):
    """``{"pixel_values": (channels, image_size, image_size) float, "labels": class index}`` per image; the
    classes are the sorted subfolder names of ``root``, the images each folder's sorted files."""

    def __init__(self, root: str | os.PathLike, image_size: int, channels: int = 3):
        self.root, self.image_size, self.channels = Path(root), image_size, channels
        if not self.root.is_dir():
            raise ConfigError(f"image folder {self.root} does not exist", "give ROOT with one subfolder per class")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        suffixes = (*NETPBM, ".npy", *PILLOW)
        self.items = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in suffixes
        ]
        if not self.items:
            raise ConfigError(
                f"{self.root} holds no images in class subfolders",
                f"lay it out as ROOT/<class>/<image> with images of {', '.join(suffixes)}",
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path, label = self.items[index]
        pixels = torch.from_numpy(np.array(_read(path))).permute(2, 0, 1).float() / 255.0
        if pixels.shape[0] != self.channels:
            pixels = pixels.mean(0, keepdim=True).expand(self.channels, -1, -1)
        size = (self.image_size, self.image_size)
        if tuple(pixels.shape[1:]) != size:
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
        return {"pixel_values": (pixels - 0.5) / 0.5, "labels": torch.tensor(label)}
