"""A trained run on new images: `dtrain.load` (the network and its preprocessing, for your own
code) and `dtrain predict` (an image folder, a CSV/Parquet manifest or a prepared dataset to a
table of class probabilities). Both decode, crop and normalise exactly as `dtrain eval` does
(dtrain.dataset.transforms: JPEGs downscaled while decoding, the centre square, [-1, 1]), so the
same image gets the same probabilities from all three."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtrain.dataset.format import dataset_splits, read_dataset_json
from dtrain.dataset.transforms import decode_image, decode_side, eval_view, to_channels
from dtrain.errors import DataError
from dtrain.prepare.sources import IMAGE_SUFFIXES, from_folder, from_manifest
from dtrain.runs.eval_outputs import predictions_table, write_parquet
from dtrain.runs.load import TrainedModel, check_classes, dataset_predictions, load_trained
from dtrain.train.report import progress

ImageInput = Image.Image | str | Path | bytes


class Preprocess:
    """Images -> the float tensor [N, C, H, W] the model takes. A PIL image is used as it was
    decoded; a file path or its bytes is decoded as `dtrain eval` decodes it (a large JPEG
    downscaled while decoding), which gives eval's probabilities to the last digit."""

    def __init__(
        self,
        classes: list[str],
        channels: int,
        image_size: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.classes, self.channels, self.image_size = classes, channels, image_size
        self.device = torch.device(device)  # the model's: `model(preprocess(image))` just works

    def __call__(self, images: ImageInput | list[ImageInput]) -> torch.Tensor:
        items = images if isinstance(images, (list, tuple)) else [images]
        return eval_view([self.decode(item) for item in items], self.image_size).to(self.device)

    def decode(self, item: ImageInput) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_channels(item, self.channels)
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        return decode_image(data, self.channels, decode_side(self.image_size, train=False))


def load(
    run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Preprocess]:
    """`(model, preprocess)`: `model(preprocess(image))` gives logits over
    `preprocess.classes`. The model is in eval mode on `device`, its weights from
    model.safetensors (else best.pt), or last.pt with `checkpoint="last"`."""
    trained = load_trained(run_dir, checkpoint, device)
    preprocess = Preprocess(trained.classes, trained.channels, trained.image_size, trained.device)
    return trained.net, preprocess


@dataclass
class ImageFiles:
    """Images to predict: paths as given (relative to `root` for a folder or a manifest) and,
    where the source has them, labels as indices into the run's classes."""

    root: Path
    paths: list[str]
    labels: np.ndarray | None


def image_files(source: Path, classes: list[str]) -> ImageFiles:
    """A folder `root/<class>/*` (labelled: each sub-folder a class of the run), a flat folder
    of images (unlabelled), or a CSV/Parquet manifest with a `path` and optionally a `label`
    column (relative paths from the manifest's folder)."""
    if source.is_dir():
        if any(p.is_dir() and not p.name.startswith(".") for p in source.iterdir()):
            found = from_folder(source)
            unknown = sorted(set(found.classes) - set(classes))
            if unknown:
                raise DataError(
                    f"{source}: sub-folder(s) {unknown} are not classes of the run {classes}; "
                    "a labelled folder holds root/<class>/<image>"
                )
            labels = np.asarray([classes.index(found.classes[i]) for i in found.labels])
            return ImageFiles(source, found.paths, labels)
        paths = sorted(
            p.name for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise DataError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageFiles(source, paths, None)
    if source.suffix.lower() not in (".csv", ".parquet"):
        what = "does not exist" if not source.exists() else "is not a .csv/.parquet manifest"
        raise DataError(f"{source} {what}; give an image folder, a manifest or a dataset folder")
    if "label" in _manifest_columns(source):
        found = from_manifest(source, classes)
        return ImageFiles(found.root, found.paths, found.labels)
    return ImageFiles(source.parent, _manifest_paths(source), None)


def _manifest_columns(path: Path) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_schema(path).names
        return pacsv.open_csv(path).schema.names
    except Exception as err:  # pyarrow raises several types for malformed files
        raise DataError(f"cannot read manifest {path}: {err}") from err


def _manifest_paths(path: Path) -> list[str]:
    """The `path` column of an unlabelled manifest, each file checked to exist."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
    if "path" not in table.column_names:
        raise DataError(f"manifest {path} has no path column; it has {table.column_names}")
    paths = table.column("path").to_pylist()
    for row, item in enumerate(paths):
        if item is None or not (path.parent / item).is_file():
            raise DataError(f"{path} row {row}: image {item} does not exist")
    if not paths:
        raise DataError(f"manifest {path} has no rows")
    return [str(item) for item in paths]


class _Decoded(torch.utils.data.Dataset):
    """Image i decoded as eval decodes it, or why it cannot be (a string)."""

    def __init__(self, files: ImageFiles, channels: int, image_size: int) -> None:
        self.files, self.channels, self.size = files, channels, image_size

    def __len__(self) -> int:
        return len(self.files.paths)

    def __getitem__(self, i: int) -> tuple[int, Image.Image | str]:
        path = self.files.root / self.files.paths[i]
        try:
            return i, decode_image(
                path.read_bytes(), self.channels, decode_side(self.size, train=False)
            )
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad files
            return i, f"{path} ({err})"

    def collate(self, items: list[tuple[int, Image.Image | str]]) -> tuple:
        good = [(i, image) for i, image in items if not isinstance(image, str)]
        bad = [reason for _, reason in items if isinstance(reason, str)]
        images = eval_view([image for _, image in good], self.size) if good else None
        return [i for i, _ in good], images, bad


@torch.no_grad()
def predict_files(
    trained: TrainedModel,
    files: ImageFiles,
    batch_size: int,
    num_workers: int,
    skip_bad_images: bool,
    show_progress: bool,
) -> tuple[list[int], np.ndarray, list[str]]:
    """Indices of the images predicted, their probabilities [N, C], and the skipped ones."""
    decoded = _Decoded(files, trained.channels, trained.image_size)
    loader = torch.utils.data.DataLoader(
        decoded, batch_size=batch_size, num_workers=num_workers, collate_fn=decoded.collate
    )
    done: list[int] = []
    parts: list[np.ndarray] = [np.zeros((0, len(trained.classes)), np.float32)]
    skipped: list[str] = []
    bar = progress(len(loader), "predicting", enabled=show_progress)
    for indices, images, bad in loader:
        if bad and not skip_bad_images:
            raise DataError(
                f"cannot decode image {bad[0]}; fix or remove the file, or pass "
                "--skip-bad-images to leave it out"
            )
        for reason in bad:
            bar.write(f"warning: skipping unreadable image {reason}", file=sys.stderr)
        skipped += bad
        if images is not None:
            with trained.autocast():
                logits = trained.net(images.to(trained.device, non_blocking=True))
            parts.append(logits.float().softmax(-1).cpu().numpy())
            done += indices
        bar.update(1)
    bar.close()
    return done, np.concatenate(parts), skipped


def predict_source(
    run_dir: str | Path,
    source: str | Path,
    out: str | Path,
    checkpoint: str = "best",
    batch_size: int = 64,
    num_workers: int = 2,
    skip_bad_images: bool = False,
) -> Path:
    """`dtrain predict`: one row per image of `source` in the parquet file `out`."""
    trained = load_trained(run_dir, checkpoint)
    source, show = Path(source), sys.stderr.isatty()
    classes = trained.classes
    if (source / "dataset.json").is_file():
        meta = read_dataset_json(str(source))
        check_classes(meta["classes"], classes, source, Path(run_dir))
        p = dataset_predictions(
            trained,
            source,
            dataset_splits(meta),
            batch_size=batch_size,
            num_workers=num_workers,
            strict=not skip_bad_images,
            show_progress=show,
        )
        table = predictions_table(
            {"key": p["key"], "path": p["path"]}, p["probs"], classes, p["label"]
        )
        skipped = []
    else:
        files = image_files(source, classes)
        done, probs, skipped = predict_files(
            trained, files, batch_size, num_workers, skip_bad_images, show
        )
        labels = None if files.labels is None else files.labels[done]
        paths = np.asarray(files.paths, dtype=object)[done]
        table = predictions_table({"path": paths}, probs, classes, labels)
    path = write_parquet(Path(out), table)
    note = f" ({len(skipped)} unreadable skipped)" if skipped else ""
    print(f"wrote {path}: {table.num_rows} images{note} (weights from {trained.weights})")
    if "suspicion" in table.column_names and table.num_rows:
        agree = np.mean(np.asarray(table["label"]) == np.asarray(table["predicted"]))
        print(f"agreement with the given labels {agree:.3f}; sort by suspicion to review them")
    return path
