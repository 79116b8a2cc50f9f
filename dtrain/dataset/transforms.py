"""Image transforms: two random views for training, one deterministic view for evaluation.

Crop and resize run per image on the PIL image, at the decoded size; flip, intensity jitter and
normalisation run once per batch on the stacked tensor, which is several times cheaper than per
image. Grayscale-aware: images become 1-channel (`L`) or 3-channel (`RGB`) before
augmenting, and the jitter touches only brightness and contrast, which mean something for both.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from dtrain.dataset.images import open_image, to_8bit

CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness and contrast factors drawn from [1 - JITTER, 1 + JITTER]
JITTER_P = 0.8


def random_resized_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's RandomResizedCrop parameters, applied as one PIL resize over the crop box
    (antialiased; twice as fast as the transform object on small images)."""
    top, left, height, width = RandomResizedCrop.get_params(image, CROP_SCALE, CROP_RATIO)
    box = (left, top, left + width, top + height)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central square, resized to `size` (Resize(size) + CenterCrop(size) in one step)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def stack(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size and mode -> uint8 [B, C, H, W]."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    return pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)


def random_flip(batch: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a random half of the batch."""
    flip = torch.rand(len(batch)) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


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
    pixels on the shorter side (a 4-8x saving for large scans trained at 64 px). Refuses
    decompression bombs (`open_image`) and truncated files (PIL's default)."""
    image = open_image(data)
    scale = max(min_side / min(image.size), 1 / 8)
    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    return to_channels(image, channels)


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """8-bit grayscale (`L`) for one channel, `RGB` otherwise."""
    return to_8bit(image).convert("L" if channels == 1 else "RGB")


def eval_view(images: list[Image.Image], size: int) -> torch.Tensor:
    """The evaluation input: each decoded image's centre square at `size` px, normalised. The one
    definition that eval, `dtrain predict` and `dtrain.load`'s preprocess share."""
    return normalise(stack([center_crop(image, size) for image in images]))


def decode_side(image_size: int, train: bool) -> int:
    """Shorter side to decode at so that the smallest random crop still has `image_size` px."""
    return math.ceil(image_size / math.sqrt(CROP_SCALE[0])) if train else image_size


def collate(samples: list[dict], size: int, train: bool) -> dict:
    """Decoded samples -> a batch: two augmented views (`view1`, `view2`) for training, the
    centre square (`image`) for evaluation, plus labels, clean labels, flags, keys and groups, and
    `skipped`: why each corrupt padding sample's original was skipped (one line each)."""
    batch = {
        "label": torch.tensor([s["label"] for s in samples]),
        "clean_label": torch.tensor([s["clean_label"] for s in samples]),
        "valid": torch.tensor([s["valid"] for s in samples]),
        "corrupt": torch.tensor([s["corrupt"] for s in samples]),
        "key": [s["key"] for s in samples],
        "group": torch.tensor([s.get("group", -1) for s in samples]),
        "skipped": [s["skipped"] for s in samples if s["corrupt"]],
    }
    if train:
        for view in ("view1", "view2"):
            crops = stack([random_resized_crop(s["image"], size) for s in samples])
            batch[view] = jitter_and_normalise(random_flip(crops))
    else:
        batch["image"] = eval_view([s["image"] for s in samples], size)
    return batch
