"""`dtrain review RUN`: a finished run's most suspicious training labels as work a clinician can
do: `index.html`, a page to work in (one click or key per image to keep, relabel or drop it,
zoom, progress, work kept across reloads, an export of the filled CSV; see dtrain.runs.review_page),
and `review.csv` with an empty `corrected_label` column to fill (a class name, `drop`, or nothing
to keep the label), which `dtrain relabel` turns into a new dataset version. A review a person
has started filling is never replaced without `--overwrite`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

from dtrain.errors import ConfigError, DataError, RunFolderError
from dtrain.prepare.folder import new_staging, publish
from dtrain.prepare.records import DATASET_JSON, MANIFEST
from dtrain.runs.review_page import ZOOM, ZOOM_SIDE, render_page
from dtrain.runs.reviewed_dataset import CORRECTION_COLUMN

REVIEW_CSV = "review.csv"
PAGE = "index.html"
THUMBS = "thumbs"
COLUMNS = (
    "rank",
    "key",
    "image",
    "thumbnail",
    "given_label",
    "predicted_label",
    "suspicion",
    CORRECTION_COLUMN,
)
# by default a tenth of the train set, at most a sitting's worth of images
DEFAULT_FRACTION = 0.1
DEFAULT_LIMIT = 500
THUMB_SIDE = 128


def review_size(total: int, top: int | None = None, fraction: float | None = None) -> int:
    """How many of `total` ranked samples to review: `top`, or `fraction` of them, or by default
    DEFAULT_FRACTION of them but at most DEFAULT_LIMIT (at least one either way)."""
    if top is not None:
        if top < 1:
            raise ConfigError(f"--top {top} must be at least 1")
        return min(top, total)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fraction {fraction} must lie in (0, 1]")
        return min(total, max(1, round(fraction * total)))
    return min(total, DEFAULT_LIMIT, max(1, round(DEFAULT_FRACTION * total)))


def filled_corrections(csv_path: Path) -> int:
    """How many rows of an existing review.csv a person has filled in; a file without the
    column, or that cannot be read as CSV, counts as filled (someone made or changed it by hand)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if CORRECTION_COLUMN not in (reader.fieldnames or []):
                return 1
            return sum(1 for row in reader if (row[CORRECTION_COLUMN] or "").strip())
    except (UnicodeDecodeError, csv.Error):
        return 1


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace a started review or a folder that is no review at all."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    existing = out / REVIEW_CSV
    others = sorted(p.name for p in out.iterdir() if p.name not in (PAGE, REVIEW_CSV, THUMBS, ZOOM))
    if existing.is_file() and others and not overwrite:
        raise DataError(
            f"{out} also holds {others[0]} (a copy of the review being worked on?), which a new "
            "review would delete; move it, choose another --out, or pass --overwrite"
        )
    if existing.is_file():
        filled = filled_corrections(existing)
        if filled and not overwrite:
            raise DataError(
                f"{existing} already holds {filled} filled {CORRECTION_COLUMN} row(s): a review "
                "in progress; apply it with dtrain relabel, choose another --out, or pass "
                "--overwrite to discard it"
            )
    elif any(out.iterdir()):
        raise DataError(
            f"--out {out} is not empty and holds no {REVIEW_CSV}: not a review folder, so it is "
            "left alone; choose another --out"
        )


def thumbnail(data: bytes) -> bytes:
    """A PNG of the image fitted into THUMB_SIDE x THUMB_SIDE (small images are enlarged)."""
    return _fitted_png(data, THUMB_SIDE, enlarge=True)


def zoom_view(data: bytes) -> bytes:
    """A PNG of the image for the page's zoom: fitted into ZOOM_SIDE x ZOOM_SIDE, never enlarged
    (the browser scales it)."""
    return _fitted_png(data, ZOOM_SIDE, enlarge=False)


def _fitted_png(data: bytes, side: int, enlarge: bool) -> bytes:
    from PIL import Image, ImageOps

    from dtrain.dataset.images import open_image, to_8bit

    image = open_image(data)
    image.draft(None, (side, side))  # JPEG: decode at the smallest scale that fits
    image = to_8bit(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    if enlarge or max(image.size) > side:
        image = ImageOps.contain(image, (side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(dataset: Path, names: dict[str, str], folder: Path, progress: bool) -> None:
    """`folder/THUMBS/<names[key]>` and `folder/ZOOM/<names[key]>` for each key, read from the
    dataset's shards: only those that hold one of the keys, each checked against its recorded
    sha256. Of the manifest only the reviewed keys' rows become Python values."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from dtrain.dataset.format import IMAGE_EXTS, check_command_url, read_dataset_json
    from dtrain.dataset.shard_reader import read_shard

    meta = read_dataset_json(str(dataset))
    manifest = pq.read_table(dataset / MANIFEST, columns=["key", "shard"])
    reviewed = manifest.filter(pc.is_in(manifest.column("key"), pa.array(list(names))))
    shard_of = dict(zip(*reviewed.to_pydict().values(), strict=True))
    missing = [key for key in names if key not in shard_of]
    if missing:
        raise DataError(
            f"the run scored sample {missing[0]}, which {dataset / MANIFEST} does not hold: the "
            "dataset changed since the run; review a run of this dataset"
        )
    for sub in (THUMBS, ZOOM):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    todo = set(names)
    for name in tqdm(
        sorted(set(shard_of.values())), desc="images", disable=None if progress else True
    ):
        info = meta["shards"][name]
        url = info.get("url", str(dataset / name))  # indexed shards lie where they were
        check_command_url(url, f"{dataset / DATASET_JSON}")
        for sample in read_shard(url, info["count"], info["sha256"], strict=True):
            if sample.key not in todo:
                continue
            if sample.problem:
                raise DataError(sample.problem)
            image = next((sample.members[e] for e in IMAGE_EXTS if e in sample.members), None)
            if image is None:
                raise DataError(f"{url} sample {sample.key}: no image member")
            try:
                (folder / THUMBS / names[sample.key]).write_bytes(thumbnail(image))
                (folder / ZOOM / names[sample.key]).write_bytes(zoom_view(image))
            except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on bad bytes
                raise DataError(f"{url} sample {sample.key}: {err}") from err
            todo.discard(sample.key)
    if todo:
        raise DataError(f"{dataset} holds no sample {sorted(todo)[0]} where its manifest says")


def most_suspicious(scores_path: Path, top: int | None, fraction: float | None) -> tuple[list, int]:
    """The rows of label_scores.parquet to review, by rank, and how many the run ranked: only
    the chosen rows are read into Python (a run of a million samples ranks a million)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    scores = pq.read_table(scores_path)
    count = review_size(scores.num_rows, top, fraction)
    chosen = pc.select_k_unstable(scores, count, sort_keys=[("rank", "ascending")])
    return scores.take(chosen).to_pylist(), scores.num_rows


def write_review(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    top: int | None = None,
    fraction: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the review of the run's most suspicious training labels to `out` (default
    RUN/review; built in a hidden sibling folder, moved into place at the end); return `out`."""
    from dtrain.runs.run_folder import run_dataset

    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "review"
    scores_path = run_dir / "label_scores.parquet"
    if not scores_path.is_file():
        raise RunFolderError(
            f"{run_dir} holds no label_scores.parquet: not a finished dtrain run (the report "
            "at the end of training writes it)"
        )
    _check_out(out, overwrite)
    dataset = run_dataset(run_dir)
    classes = json.loads((dataset / DATASET_JSON).read_text())["classes"]
    chosen, total = most_suspicious(scores_path, top, fraction)
    rows = [
        {
            "rank": r["rank"],
            "key": r["key"],
            "image": r["source"],
            "thumbnail": f"{THUMBS}/{r['rank']:06d}.png",
            "given_label": classes[r["noisy_label"]],
            "predicted_label": classes[r["predicted_label"]],
            "suspicion": "" if math.isnan(r["score"]) else f"{r['score']:.4f}",
            CORRECTION_COLUMN: "",
        }
        for r in chosen
    ]
    losses = [r.get("loss_score", math.nan) for r in chosen]
    # the browser keeps a review's work under this id: another run or other images, another id
    review_id = hashlib.sha256(
        json.dumps([str(run_dir.resolve()), [r["key"] for r in rows]]).encode()
    ).hexdigest()[:16]
    staging = new_staging(out)
    try:
        names = {r["key"]: Path(r["thumbnail"]).name for r in rows}
        write_images(dataset, names, staging, progress)
        with open(staging / REVIEW_CSV, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        page = render_page(rows, losses, classes, COLUMNS, run_dir, dataset, review_id, total=total)
        (staging / PAGE).write_text(page, encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)
    print(
        f"wrote {out}: {PAGE} and {REVIEW_CSV}, the {len(rows)} most suspicious of "
        f"{total} training labels. Serve it (a browser keeps a file:// page's work unreliably)\n"
        f"  python -m http.server 8765 --bind 127.0.0.1 -d {out}\n"
        f"open http://127.0.0.1:8765/, review, export {REVIEW_CSV} (or fill its "
        f"{CORRECTION_COLUMN} by hand), then\n"
        f"  dtrain relabel {dataset} {REVIEW_CSV} --out {dataset}_reviewed"
    )
    return out
