"""Image transforms: two random views for training, one deterministic view for evaluation.

Geometry (crop, flip, resize) runs per image on the PIL image, at the decoded size; intensity
jitter and normalisation run once per batch on the stacked uint8 tensor, which is several times
cheaper than per image. Grayscale-aware: images become 1-channel (`L`) or 3-channel (`RGB`) before
augmenting, and the jitter touches only brightness and contrast, which mean something for both.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torchvision.transforms import v2

MIN_CROP_SCALE = 0.35
JITTER = 0.2  # brightness and contrast factors drawn from [1 - JITTER, 1 + JITTER]
JITTER_P = 0.8


def train_geometry(image_size: int) -> v2.Compose:
    """Random resized crop and horizontal flip, to a uint8 tensor."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(MIN_CROP_SCALE, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def eval_geometry(image_size: int) -> v2.Compose:
    """Shorter side to `image_size`, centre crop, to a uint8 tensor."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
    ])


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [-1, 1]."""
    return batch.float().mul_(2 / 255).sub_(1)


def jitter_and_normalise(batch: torch.Tensor) -> torch.Tensor:
    """Per-sample random brightness and contrast (each applied with probability JITTER_P), as
    torchvision's ColorJitter defines them, then `normalise`."""
    x = batch.float().div_(255)
    n = len(x)
    shape = (n, 1, 1, 1)
    apply = (torch.rand(shape) < JITTER_P).float()
    brightness = 1 + apply * (torch.rand(shape) * 2 - 1) * JITTER
    contrast = 1 + apply * (torch.rand(shape) * 2 - 1) * JITTER
    x = (x * brightness).clamp_(0, 1)
    gray_mean = x.mean(dim=(1, 2, 3), keepdim=True)  # grayscale mean (channel mean for RGB)
    x = ((x - gray_mean) * contrast + gray_mean).clamp_(0, 1)
    return x.mul_(2).sub_(1)


def decode_image(data: bytes, channels: int, min_side: int) -> Image.Image:
    """Decode, letting the JPEG decoder downscale while decoding as far as keeps `min_side`
    pixels on the shorter side (a 4-8x saving for large scans trained at 64 px)."""
    image = Image.open(io.BytesIO(data))
    scale = max(min_side / min(image.size), 1 / 8)
    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    return image.convert("L" if channels == 1 else "RGB")


def decode_side(image_size: int, train: bool) -> int:
    """Shorter side to decode at so that the smallest random crop still has `image_size` px."""
    return math.ceil(image_size / math.sqrt(MIN_CROP_SCALE)) if train else image_size
