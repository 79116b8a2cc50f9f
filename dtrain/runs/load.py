"""A finished run's network, ready to use: rebuilt from `model.safetensors` (the best weights)
or from best.pt / last.pt, with its classes and the preprocessing it was trained with; and its
predictions over a prepared dataset, decoded to its own channels whatever the dataset's."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from dtrain.config import config_from_dict
from dtrain.dataset.format import read_dataset_json, split_urls
from dtrain.dataset.loader import make_loader
from dtrain.errors import DataError, RunFolderError
from dtrain.methods.model import build_model
from dtrain.train.checkpoint import load_checkpoint, selected_weights
from dtrain.train.evaluation import predict
from dtrain.train.export import MODEL_FILE, read_model_file

CHECKPOINTS = ("best", "last")


@dataclasses.dataclass
class TrainedModel:
    net: torch.nn.Module  # in eval mode, on `device`
    classes: list[str]
    channels: int
    image_size: int
    precision: str  # the run's train.precision
    device: torch.device
    weights: Path  # the file the weights came from

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 where the run evaluated in bf16 (train.precision=auto on CUDA, or bf16), so that
        `dtrain eval` here scores as the run's own test did."""
        bf16 = self.precision == "bf16" or (
            self.precision == "auto"
            and self.device.type == "cuda"
            and torch.cuda.is_bf16_supported()
        )
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)


def load_trained(
    run_dir: str | Path, checkpoint: str = "best", device: str | torch.device | None = None
) -> TrainedModel:
    """The run's `checkpoint` (best: model.safetensors when present, else best.pt; last:
    last.pt, read with weights_only) on `device` (default: CUDA when available)."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise RunFolderError(f"checkpoint {checkpoint!r} is neither of {', '.join(CHECKPOINTS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = run_dir / MODEL_FILE
    if checkpoint == "best" and source.is_file():
        weights, meta = read_model_file(source)
        config = config_from_dict({"model": meta["model"], "method": {"name": meta["method"]}})
        classes, precision = meta["classes"], meta["precision"]
        channels = meta["preprocessing"]["channels"]
        image_size = meta["preprocessing"]["image_size"]
    else:
        source = run_dir / f"{checkpoint}.pt"
        if not source.is_file():
            raise RunFolderError(
                f"{run_dir} holds no {source.name}: not a dtrain run folder, or the run has not "
                "saved a checkpoint yet"
            )
        saved = load_checkpoint(source)
        config = config_from_dict(saved["config"])
        weights = selected_weights(saved) if checkpoint == "best" else saved["model"]
        classes = saved["classes"]
        channels = saved.get("channels") or _dataset_channels(run_dir)
        image_size, precision = config.data.image_size, config.train.precision
    # the weights come from the file: never fetch the backbone's pretrained ones
    model_config = dataclasses.replace(config.model, pretrained=False)
    net = build_model(model_config, config.method.name, len(classes), channels)
    net.load_state_dict(weights)
    net.eval().to(device)
    return TrainedModel(net, list(classes), channels, image_size, precision, device, source)


def _dataset_channels(run_dir: Path) -> int:
    """For a checkpoint written before checkpoints recorded their channels."""
    from dtrain.runs.run_folder import run_dataset

    return read_dataset_json(str(run_dataset(run_dir)))["images"]["channels"]


def check_classes(classes: list[str], trained: list[str], data_dir: Path, run_dir: Path) -> None:
    """A dataset's labels mean the run's classes only if the names and their order match."""
    if classes == trained:
        return
    hint = (
        f"the order differs: re-prepare it with --classes {','.join(trained)}"
        if sorted(classes) == sorted(trained)
        else "the class names differ"
    )
    raise DataError(
        f"{data_dir} has classes {classes} but run {run_dir} was trained on {trained}; {hint}"
    )


def dataset_predictions(
    trained: TrainedModel,
    data_dir: Path,
    splits: list[str],
    *,
    batch_size: int,
    num_workers: int,
    strict: bool,
    show_progress: bool,
) -> dict[str, np.ndarray]:
    """`predict` over the splits' shards, with each sample's source path from the dataset's
    manifest.parquet (`path`; empty where there is none)."""
    loader = make_loader(
        [url for split in splits for url in split_urls(data_dir, split)],
        train=False,
        batch_size=batch_size,
        image_size=trained.image_size,
        channels=trained.channels,
        num_classes=len(trained.classes),
        num_workers=num_workers,
        rank=0,
        world_size=1,
        strict=strict,
        pin_memory=trained.device.type == "cuda",
        meta=read_dataset_json(str(data_dir)),  # indexed shards are listed only there
    )
    p = predict(trained.net, loader, trained.device, trained.autocast, show_progress)
    sources = _manifest_sources(data_dir / "manifest.parquet")
    p["path"] = np.asarray([sources.get(key, "") for key in p["key"]], dtype=object)
    return p


def _manifest_sources(manifest: Path) -> dict[str, str]:
    if not manifest.is_file():
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(manifest, columns=["key", "source"]).to_pydict()
    return dict(zip(table["key"], table["source"], strict=True))
