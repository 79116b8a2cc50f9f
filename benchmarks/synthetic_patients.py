"""Synthetic chest films, one patient each, with planted near-duplicate copies.

Why: `dtrain prepare` joins near-duplicates into one group so that copies of one scan never sit
in both train and test. That needs testing on images that look alike the way chest films do (one
layout, each patient's own anatomy, pose, exposure and noise): copies of one scan filed under
another patient id must be found, and two patients must never be joined. Preparation must also
be benchmarked at 10k, 100k and 1M images, which no set in the repository provides.

Every film is drawn with vectorised numpy from its own seed, `(seed, index)`, so the output does
not depend on how the work is cut up or on the number of workers. A share `copy_fraction` of the
`n` images are copies of an original, each changed in one of `COPY_KINDS` ways and filed under
a new patient id with the original's label. Label 1 ("nodule") is a small bright blob inside a
lung, on about half the patients.

    python benchmarks/synthetic_patients.py OUT --n 30000 [--side 64] [--copy-fraction 0.1] \
        [--seed 0] [--workers 2]

writes OUT/images/<index // 1000>/<index>.jpg (at most 1000 files a folder) and
OUT/manifest.csv with `path,label,patient_id,copy_of,copy_kind` (paths relative to OUT), and
prints the images/s. Prepare it with
`dtrain prepare OUT/manifest.csv --classes normal,nodule`: without --classes dtrain sorts the
label names, and "nodule" becomes class 0.
"""

from __future__ import annotations

import argparse
import csv
import io
import multiprocessing
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("normal", "nodule")  # label 0 and 1
COPY_KINDS = ("exact", "resized", "reencoded", "cropped", "brightness", "flipped")
MANIFEST_COLUMNS = ("path", "label", "patient_id", "copy_of", "copy_kind")
FOLDER_SIZE = 1000  # images per sub-folder of images/
CHUNK = 250  # images per unit of work
BATCH = 64  # films drawn at once: large enough to amortise numpy's overhead, small enough for cache
QUALITY = 90
TEXTURE_GRID = 5  # the smooth texture is a random TEXTURE_GRID^2 field, upsampled
# the seed streams: SeedSequence(seed, spawn_key=(stream, index)) never collide
PLAN_STREAM, FILM_STREAM, COPY_STREAM = 0, 1, 2

# Each patient's film, as uniform draws over (low, high). Coordinates run -1..1 across the film,
# x to the right, y down; the heart is on the image's right, as on a PA film.
RANGES = {
    "angle": (-6.0, 6.0),  # degrees
    "shift_x": (-0.08, 0.08),  # 4 % of the side
    "shift_y": (-0.08, 0.08),
    "scale": (0.92, 1.08),
    "body_w": (0.72, 0.98),  # half-width of the soft-tissue outline
    "right_x": (-0.54, -0.34),  # the lung on the image's left
    "right_y": (-0.16, 0.06),
    "right_w": (0.18, 0.34),
    "right_h": (0.42, 0.66),
    "right_dome": (0.22, 0.42),  # top of its hemidiaphragm
    "left_x": (0.34, 0.54),
    "left_y": (-0.14, 0.08),
    "left_w": (0.16, 0.32),
    "left_h": (0.40, 0.64),
    "left_dome": (0.28, 0.48),
    "dome_curve": (0.6, 1.8),
    "heart_x": (0.04, 0.30),
    "heart_y": (0.14, 0.40),
    "heart_w": (0.18, 0.36),
    "heart_h": (0.16, 0.30),
    "spine_x": (-0.03, 0.03),
    "spine_w": (0.06, 0.10),
    "rib_spacing": (0.14, 0.22),
    "rib_curve": (0.3, 0.8),
    "rib_phase": (0.0, 2 * np.pi),
    "rib_gain": (0.08, 0.16),
    "lung_dark": (0.34, 0.46),
    "texture": (0.10, 0.20),  # tissue thickness and exposure, uneven
    "gamma": (0.8, 1.25),
    "contrast": (0.8, 1.15),
    "brightness": (-0.08, 0.08),
    "pixel_noise": (1.0, 4.0),  # grey levels
    "nodule_lung": (0.0, 1.0),  # < 0.5: the left one
    "nodule_angle": (np.pi, 2 * np.pi),  # the lung's upper half: clear of heart and diaphragm
    "nodule_radius": (0.0, 0.36),  # squared, in lung axes: uniform over the inner 0.6
    "nodule_size": (0.035, 0.06),
    "nodule_gain": (0.18, 0.3),
}
LOW, HIGH = (np.asarray(v, dtype=np.float32) for v in zip(*RANGES.values(), strict=True))


def image_path(index: int) -> str:
    """Where image `index` lies, relative to the output folder."""
    return f"images/{index // FOLDER_SIZE:04d}/{index:07d}.jpg"


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def plan(n: int, copy_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of the `n` images: the index of the original it shows (its own for originals),
    its copy kind (an index into COPY_KINDS, -1 for originals) and its label (0 or 1).

    Copies sit at random places and copy random originals (some twice); the kinds are dealt out
    evenly, so that each appears once there are six copies."""
    rng = _rng(seed, PLAN_STREAM, 0)
    num_copies = min(round(n * copy_fraction), n - 1)
    copies = np.sort(rng.choice(n, num_copies, replace=False))
    is_copy = np.zeros(n, dtype=bool)
    is_copy[copies] = True
    original = np.arange(n)
    original[copies] = rng.choice(np.flatnonzero(~is_copy), num_copies)
    kind = np.full(n, -1, dtype=np.int8)
    kind[copies] = rng.permutation(np.arange(num_copies) % len(COPY_KINDS))
    label = (rng.random(n) < 0.5).astype(np.int8)
    label[copies] = label[original[copies]]
    return original, kind, label


def _upsample(side: int) -> np.ndarray:
    """The (side, TEXTURE_GRID) matrix of linear interpolation from the coarse grid."""
    position = np.clip((np.arange(side) + 0.5) * TEXTURE_GRID / side - 0.5, 0, TEXTURE_GRID - 1)
    low = np.minimum(position.astype(int), TEXTURE_GRID - 2)
    weights = np.zeros((side, TEXTURE_GRID), dtype=np.float32)
    weights[np.arange(side), low] = 1 - (position - low)
    weights[np.arange(side), low + 1] = position - low
    return weights


def _ellipse(u: np.ndarray, v: np.ndarray, x, y, w, h, edge: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a soft rim (wider for smaller `edge`)."""
    r2 = np.square((u - x) / w) + np.square((v - y) / h)
    return np.clip((1 - r2) * edge, 0, 1)


def _dome(u: np.ndarray, v: np.ndarray, x, top, curve) -> np.ndarray:
    """1 above a hemidiaphragm peaking at (x, top), 0 below it."""
    return np.clip((top + curve * np.square(u - x) - v) * 12, 0, 1)


def draw_films(indices: np.ndarray, labels: np.ndarray, side: int, seed: int) -> np.ndarray:
    """The films of patients `indices` (uint8, len x side x side); a label of 1 adds a nodule."""
    rngs = [_rng(seed, FILM_STREAM, int(i)) for i in indices]
    draws = np.stack([r.random(len(RANGES), dtype=np.float32) for r in rngs])
    values = (LOW + (HIGH - LOW) * draws).T[:, :, None, None]
    p = dict(zip(RANGES, values, strict=True))
    grain = (TEXTURE_GRID, TEXTURE_GRID)
    coarse = np.stack([r.standard_normal(grain, dtype=np.float32) for r in rngs])
    pixel = np.stack([r.standard_normal((side, side), dtype=np.float32) for r in rngs])

    grid = (np.arange(side, dtype=np.float32) + 0.5) / side * 2 - 1
    angle = np.deg2rad(p["angle"])
    cos, sin = np.cos(angle), np.sin(angle)
    x = (grid[None, None, :] - p["shift_x"]) / p["scale"]
    y = (grid[None, :, None] - p["shift_y"]) / p["scale"]
    u, v = cos * x + sin * y, cos * y - sin * x  # the patient's coordinates of each pixel

    body = _ellipse(u, v, 0.0, 0.15, p["body_w"], 1.25, 6.0)
    heart = _ellipse(u, v, p["heart_x"], p["heart_y"], p["heart_w"], p["heart_h"], 4.0)
    lungs = sum(
        _ellipse(u, v, p[f"{s}_x"], p[f"{s}_y"], p[f"{s}_w"], p[f"{s}_h"], 5.0)
        * _dome(u, v, p[f"{s}_x"], p[f"{s}_dome"], p["dome_curve"])
        for s in ("right", "left")
    ) * (1 - heart)
    spine = np.clip((p["spine_w"] - np.abs(u - p["spine_x"])) * 20, 0, 1)
    arcs = (v - p["rib_curve"] * np.square(u)) * (2 * np.pi / p["rib_spacing"]) + p["rib_phase"]
    ribs = np.clip((np.cos(arcs) - 0.2) * 2, 0, 1)
    upsample = _upsample(side)
    texture = upsample @ coarse @ upsample.T

    density = 0.06 + body * (0.56 + 0.12 * spine + 0.08 * heart + p["texture"] * texture)
    density -= lungs * (p["lung_dark"] - p["rib_gain"] * ribs)
    sick = np.flatnonzero(labels == 1)
    if len(sick):
        q = {k: v[sick] for k, v in p.items()}
        left = q["nodule_lung"] < 0.5
        lung = {a: np.where(left, q[f"left_{a}"], q[f"right_{a}"]) for a in "xywh"}
        radius = np.sqrt(q["nodule_radius"])
        nx = lung["x"] + radius * np.cos(q["nodule_angle"]) * lung["w"]
        ny = lung["y"] + radius * np.sin(q["nodule_angle"]) * lung["h"]
        d2 = np.square(u[sick] - nx) + np.square(v[sick] - ny)
        density[sick] += q["nodule_gain"] * np.exp(-d2 / (2 * np.square(q["nodule_size"])))

    exposed = p["brightness"] + p["contrast"] * np.power(np.clip(density, 1e-3, 1), p["gamma"])
    grey = exposed * 255 + p["pixel_noise"] * pixel
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


def encode(image: Image.Image, quality: int = QUALITY) -> bytes:
    """JPEG bytes of a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_copy(jpeg: bytes, kind: str, rng: np.random.Generator, side: int) -> bytes:
    """A copy of the JPEG `jpeg`, changed as `kind` (one of COPY_KINDS) says."""
    if kind == "exact":
        return jpeg
    image = Image.open(io.BytesIO(jpeg))
    if kind == "resized":
        if rng.random() < 0.5:  # down to 50-80 %, then back up
            small = round(side * rng.uniform(0.5, 0.8))
            image = image.resize((small, small), Image.Resampling.BILINEAR)
            image = image.resize((side, side), Image.Resampling.BILINEAR)
        else:  # up by 25-100 %, and stored so
            large = round(side * rng.uniform(1.25, 2.0))
            image = image.resize((large, large), Image.Resampling.BICUBIC)
    elif kind == "reencoded":
        data = encode(image, int(rng.integers(40, 71)))
        if rng.random() < 0.5:
            data = encode(Image.open(io.BytesIO(data)), int(rng.integers(40, 71)))
        return data
    elif kind == "cropped":
        left, top, right, bottom = rng.uniform(0.03, 0.08, 4) * side
        box = (left, top, side - right, side - bottom)
        image = image.resize((side, side), Image.Resampling.BILINEAR, box=box)
    elif kind == "brightness":
        change = rng.uniform(0.1, 0.2) * rng.choice((-1, 1))
        pixels = np.asarray(image, dtype=np.float32)
        pixels = pixels * (1 + change) if rng.random() < 0.5 else pixels + 255 * change
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    elif kind == "flipped":
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        raise ValueError(f"unknown copy kind {kind!r}; known: {COPY_KINDS}")
    return encode(image)


def _write_chunk(task: tuple[Path, int, int, int, np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Write images start.. of the plan's slice (original, kind, label); the count written."""
    out, side, seed, start, original, kind, label = task
    shown, first = np.unique(original, return_index=True)
    films: dict[int, bytes] = {}
    for b in range(0, len(shown), BATCH):
        batch = shown[b : b + BATCH]
        pixels = draw_films(batch, label[first[b : b + BATCH]], side, seed)
        films.update(zip(batch.tolist(), map(encode, map(Image.fromarray, pixels)), strict=True))
    for offset, (o, k) in enumerate(zip(original.tolist(), kind.tolist(), strict=True)):
        index = start + offset
        data = films[o]
        if k >= 0:
            data = make_copy(data, COPY_KINDS[k], _rng(seed, COPY_STREAM, index), side)
        (out / image_path(index)).write_bytes(data)
    return len(original)


def generate(
    out: Path,
    n: int,
    side: int = 64,
    copy_fraction: float = 0.1,
    seed: int = 0,
    workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write `n` films (originals and copies) under `out/images/` and `out/manifest.csv`; return
    the manifest. The bytes depend on (n, side, copy_fraction, seed) only, not on `workers`
    (given one numpy and Pillow)."""
    if n < 1 or side < 16 or not 0 <= copy_fraction < 1 or workers < 1:
        raise ValueError(
            f"need n >= 1, side >= 16, 0 <= copy_fraction < 1, workers >= 1; got n={n}, "
            f"side={side}, copy_fraction={copy_fraction}, workers={workers}"
        )
    from tqdm.auto import tqdm

    out = Path(out)
    for first in range(0, n, FOLDER_SIZE):
        (out / image_path(first)).parent.mkdir(parents=True, exist_ok=True)
    original, kind, label = plan(n, copy_fraction, seed)
    tasks = (
        (out, side, seed, s, original[s : s + CHUNK], kind[s : s + CHUNK], label[s : s + CHUNK])
        for s in range(0, n, CHUNK)
    )
    with tqdm(total=n, unit="img", disable=not progress) as bar:
        if workers == 1:
            for task in tasks:
                bar.update(_write_chunk(task))
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for count in pool.imap_unordered(_write_chunk, tasks):
                    bar.update(count)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        rows = zip(original.tolist(), kind.tolist(), label.tolist(), strict=True)
        for i, (o, k, y) in enumerate(rows):
            copy_of, copy_kind = (image_path(o), COPY_KINDS[k]) if k >= 0 else ("", "")
            writer.writerow((image_path(i), CLASSES[y], f"p{i:07d}", copy_of, copy_kind))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--n", type=int, default=30_000, help="images, copies included")
    parser.add_argument("--side", type=int, default=64, help="pixels")
    parser.add_argument("--copy-fraction", type=float, default=0.1, help="share of copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes")
    args = parser.parse_args()
    began = time.perf_counter()
    manifest = generate(
        args.out, args.n, args.side, args.copy_fraction, args.seed, args.workers, progress=True
    )
    seconds = time.perf_counter() - began
    print(
        f"{manifest}: {args.n} images of {args.side} px in {seconds:.1f} s, "
        f"{args.n / seconds:.0f} images/s ({args.n / seconds / args.workers:.0f} per worker)"
    )


if __name__ == "__main__":
    main()
