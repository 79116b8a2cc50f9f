"""`model.safetensors`: a finished run's best weights beside the checkpoints, in a format any
tool reads without pickle, with what it takes to use them in its metadata (each value JSON):
the classes, the preprocessing, and the model config and method that rebuild the network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dtrain.errors import RunFolderError
from dtrain.files import write_atomic
from dtrain.train.checkpoint import BEST, load_checkpoint, selected_weights

MODEL_FILE = "model.safetensors"
FORMAT = "dtrain-model/1"


def preprocessing(image_size: int, channels: int) -> dict:
    """The evaluation transform (dtrain.dataset.transforms.eval_view), in words and numbers."""
    return {
        "image_size": image_size,
        "channels": channels,
        "colour": "grayscale (L)" if channels == 1 else "RGB",
        "crop": "centre square of the shorter side, resized bilinear to image_size",
        "normalisation": "pixel / 127.5 - 1: [0, 255] to [-1, 1]",
    }


def export_best(run_dir: Path, channels: int) -> Path:
    """Write `run_dir/model.safetensors` from best.pt (atomically: a temp file, then a
    rename), so that it always holds the weights best.pt holds."""
    checkpoint = load_checkpoint(run_dir / BEST)
    config = checkpoint["config"]
    metadata = {
        "format": FORMAT,
        "classes": checkpoint["classes"],
        "preprocessing": preprocessing(config["data"]["image_size"], channels),
        "method": config["method"]["name"],
        "model": config["model"],
        "precision": config["train"]["precision"],
        "step": checkpoint["state"]["step"],
    }
    from safetensors.torch import save

    tensors = {name: value.contiguous() for name, value in selected_weights(checkpoint).items()}
    content = save(tensors, {key: json.dumps(value) for key, value in metadata.items()})
    return write_atomic(run_dir / MODEL_FILE, content)


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and decoded metadata of a `model.safetensors` that dtrain wrote."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RunFolderError(f"cannot read {path} ({err}); delete it to use best.pt") from err
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as err:
        raise RunFolderError(f"{path}: metadata is not JSON ({err})") from err
    if metadata.get("format") != FORMAT:
        raise RunFolderError(
            f"{path} is not a {FORMAT} file (format {metadata.get('format')!r}); delete it "
            "to use best.pt"
        )
    return weights, metadata
