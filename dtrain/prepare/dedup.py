"""Near-duplicate grouping: copies of one scan (resized, re-encoded, cropped a little, brightness
shifted, mirrored) share a group, so that a split by group keeps them out of both train and
test, while two patients filmed in the same layout do not.

Each image gets a 256-bit perceptual hash (pHash: the signs of its low 16x16 DCT coefficients
against their median, on 64x64 grayscale pixels; Zauner 2010, as `imagehash.phash(hash_size=16)`
computes it) and the hash of its mirror image, which follows from the same coefficients
(mirroring negates the odd horizontal frequencies). 64 bits, pHash's usual size, cannot tell
apart two patients filmed in one layout (benchmarks/dedup_quality.py). Images whose hashes lie
within a Hamming distance are joined.

A crop moves every pixel, so a cropped copy's hash is as far from its original's as another
patient's. Each image therefore also hashes 16 windows of itself, each side cut by 4 % or 7 %
(WINDOW_INSETS): a copy cut by 2.5-8.5 % a side lies within 1.5 % a side of one of them, and its
hash near that window's. The windows are queries only; the index holds one hash per image.

Up to EXACT_UP_TO images the search is exact: faiss compares every pair (N^2 popcounts of 256
bits). Above, it searches an inverted file: each query compares the images of the PROBES lists
whose centres lie nearest to it, about N * PROBES * LIST_SIZE popcounts, so its time per image
does not grow with N as the exact search's does (which the windows' 16 queries an image made the
larger part of prepare at 100k images). Either way the queries run in blocks, as tasks on
prepare's engine, so on every core or a cluster; each worker holds the hashes (32 bytes an
image), a block carries its windows, and only the pairs found come back. Multi-index hashing,
which is exact and sub-quadratic on uniform hashes, was slower here: films that share a layout
share bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from PIL import Image

from dtrain.dataset.images import open_image, to_8bit
from dtrain.prepare.engines import run_tasks
from dtrain.prepare.split import number_by_first_appearance

THUMB_SIDE = 16  # the instance-noise features: 16x16 grayscale pixels
HASH_SIDE = 64  # pHash's input
HASH_LOW = 16  # the low frequencies kept: 16x16 = 256 bits
HASH_BITS = HASH_LOW * HASH_LOW
HASH_BYTES = HASH_BITS // 8
WINDOW_INSETS = (0.04, 0.07)  # the share of a side each window cuts off, per side
WINDOWS = len(WINDOW_INSETS) ** 4
# bits of 256, up to REFERENCE_IMAGES images, then BITS_PER_DECADE fewer per tenfold more:
# chosen on synthetic patients (benchmarks/dedup_quality.py at 30k, dedup_scale.py at 1M). Two
# hashes have 128 ones each, so they lie an even number of bits apart: 27 bits join as 26 do.
DEFAULT_DISTANCE = 26
REFERENCE_IMAGES = 30_000
BITS_PER_DECADE = 4
QUERY_BLOCK = 1 << 15  # queries per task: 32 tasks at a million images
LIST_SIZE = 256  # images per inverted list, on average
PROBES = 16  # lists each query searches; chosen on synthetic patients (benchmarks/dedup_scale.py)
# images `auto` compares pair by pair: up to here the inverted file would search every list
# anyway; above, it is faster (with the windows: 0.25x the time at 30k, 0.06x at 100k) and
# groups all but a few images alike (benchmarks/dedup_quality.py)
EXACT_UP_TO = LIST_SIZE * PROBES


SearchKind = Literal["auto", "exact", "inverted"]


class BadImageError(ValueError):
    """An image that cannot be decoded."""


def default_distance(images: int) -> int:
    """The distance prepare joins images within unless told: DEFAULT_DISTANCE bits up to
    REFERENCE_IMAGES images, BITS_PER_DECADE fewer for each tenfold beyond. At a fixed distance
    the other patients within it grow with N, and chains of them join into ever larger groups
    (synthetic films at 28 bits: 0.07 % of patients joined at 30k, 1.2 % at a million, the
    largest group then over 800 patients); each 2 bits fewer cut that about threefold, while copies
    of one scan mostly lie within 16 bits."""
    if images <= REFERENCE_IMAGES:
        return DEFAULT_DISTANCE
    return round(DEFAULT_DISTANCE - BITS_PER_DECADE * math.log10(images / REFERENCE_IMAGES))


def _dct2(pixels: np.ndarray) -> np.ndarray:
    from scipy.fft import dct

    return dct(dct(pixels, axis=0), axis=1)


def perceptual_hashes(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The packed pHash of square grayscale pixels, that of their mirror image, and whether the
    pixels are constant (whose hash says nothing about them)."""
    low = _dct2(gray.astype(np.float64))[:HASH_LOW, :HASH_LOW]
    mirrored = low * np.where(np.arange(HASH_LOW) % 2, -1.0, 1.0)[None, :]
    bits = [block > np.median(block) for block in (low, mirrored)]
    return np.packbits(bits[0]), np.packbits(bits[1]), bool(np.ptp(gray) == 0)


@lru_cache(maxsize=64)
def _window_rows(side: int) -> np.ndarray:
    """[len(WINDOW_INSETS)^2, HASH_LOW, side]: for each (start, end) inset pair along an axis of
    `side` pixels, the low DCT-II rows of that span resampled to HASH_SIDE pixels by area: a
    window's low frequencies are rows @ pixels @ columns.T, with no window resized."""
    from scipy.fft import dct

    basis = dct(np.eye(HASH_SIDE), axis=0)[:HASH_LOW]
    pixel = np.arange(side)
    out = []
    for start in WINDOW_INSETS:
        for end in WINDOW_INSETS:
            edges = np.linspace(start * side, side - end * side, HASH_SIDE + 1)
            overlap = np.minimum(pixel + 1, edges[1:, None]) - np.maximum(pixel, edges[:-1, None])
            area = np.clip(overlap, 0, None)
            out.append(basis @ (area / area.sum(axis=1, keepdims=True)))
    return np.stack(out)


def window_hashes(gray: np.ndarray) -> np.ndarray:
    """[WINDOWS, HASH_BYTES]: the packed pHash of each window of grayscale pixels, every
    combination of WINDOW_INSETS on the top, bottom, left and right sides."""
    rows, cols = _window_rows(gray.shape[0]), _window_rows(gray.shape[1])
    side = len(WINDOW_INSETS) ** 2
    low = (rows @ gray.astype(np.float64)) @ cols.reshape(-1, gray.shape[1]).T  # [a, i, b j]
    low = low.reshape(side, HASH_LOW, side, HASH_LOW).transpose(0, 2, 1, 3)
    low = low.reshape(WINDOWS, HASH_BITS)
    return np.packbits(low > np.median(low, axis=1, keepdims=True), axis=1)


def _decoded(data: bytes) -> tuple[Image.Image, tuple[int, int]]:
    """8-bit RGB pixels at about twice the hash's side, and the image's own size. The JPEG
    decoder's draft mode downsamples while decoding, which makes this cheap. Truncated files and
    decompression bombs (`open_image`) are bad images."""
    try:
        image = open_image(data)
        size = image.size
        image.draft(None, (HASH_SIDE * 2, HASH_SIDE * 2))
        return to_8bit(image).convert("RGB"), size
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise BadImageError(str(err)) from err


def _thumbnail(image: Image.Image) -> tuple[np.ndarray, bool]:
    """16x16 RGB pixels, and whether they are all grays (within 8 levels)."""
    rgb = np.asarray(image.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), np.float32)
    return rgb, bool(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).max() < 8.0)


def fingerprint(data: bytes) -> dict:
    """What prepare keeps of one image: its hashes (`hash`, `mirror`, `windows`), whether it is
    constant, whether it is grayscale, its size, and its 16x16 grayscale pixels (`thumb`)."""
    image, size = _decoded(data)
    rgb, gray = _thumbnail(image)
    luma = image.convert("L")
    pixels = np.asarray(luma.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS))
    code, mirror, constant = perceptual_hashes(pixels)
    return {
        "hash": code,
        "mirror": mirror,
        "windows": window_hashes(np.asarray(luma)),
        "constant": constant,
        "gray": gray,
        "size": size,
        "thumb": rgb.mean(axis=2).round().astype(np.uint8),
        "value": int(pixels.flat[0]),
    }


def is_grayscale(data: bytes) -> bool:
    """Whether an image's colours are all grays (within 8 levels); no hashes computed."""
    return _thumbnail(_decoded(data)[0])[1]


@dataclass
class HashSearch:
    """What every search worker holds: the hashes (the index) and their mirrors (more queries),
    the distance, and for an inverted file the centres of its lists (None: compare every
    pair). The faiss index is built once per worker, on its first block."""

    codes: np.ndarray
    mirrors: np.ndarray
    radius: int
    centroids: np.ndarray | None = None
    probes: int = PROBES
    index: Any = field(default=None, repr=False)

    def build(self) -> Any:
        import faiss

        if self.centroids is None:
            index = faiss.IndexBinaryFlat(HASH_BITS)
        else:
            quantizer = faiss.IndexBinaryFlat(HASH_BITS)
            quantizer.add(self.centroids)
            index = faiss.IndexBinaryIVF(quantizer, HASH_BITS, len(self.centroids))
            index.quantizer_ref = quantizer  # faiss does not own it: keep it alive
            index.nprobe = self.probes
        index.add(self.codes)
        return index

    def __getstate__(self) -> dict:  # a worker builds its own index
        return {**self.__dict__, "index": None}


@dataclass(frozen=True)
class QueryBlock:
    """Images start..stop, queried by their hashes, their mirrors' or their windows' (which
    travel with the block: a worker holds one block's windows, not all of them)."""

    start: int
    stop: int
    mirrored: bool = False
    windows: np.ndarray | None = field(default=None, repr=False)  # [stop - start, WINDOWS, 32]


def search_block(search: HashSearch, block: QueryBlock) -> dict:
    """One task: the pairs (i, j), i in the block, with Hamming(a query of i, code j) <= radius
    and i != j (faiss' range is exclusive: distance < radius + 1)."""
    if search.index is None:
        search.index = search.build()
    if block.windows is not None:
        queries, per_image = block.windows.reshape(-1, HASH_BYTES), block.windows.shape[1]
    else:
        queries = (search.mirrors if block.mirrored else search.codes)[block.start : block.stop]
        per_image = 1
    limits, _, ids = search.index.range_search(queries, search.radius + 1)
    owner = block.start + np.arange(len(queries)) // per_image
    rows = np.repeat(owner, np.diff(limits).astype(np.int64))
    keep = rows != ids
    return {"pairs": np.stack([rows[keep], ids[keep].astype(np.int64)], axis=1)}


def resolved_search(kind: SearchKind, images: int) -> SearchKind:
    """`auto`: the exact search up to EXACT_UP_TO images, the inverted file above."""
    if kind != "auto":
        return kind
    return "exact" if images <= EXACT_UP_TO else "inverted"


def list_centres(
    codes: np.ndarray, kind: SearchKind, list_size: int = LIST_SIZE
) -> np.ndarray | None:
    """The centres of an inverted file's lists, one per `list_size` hashes: a sample of the
    hashes themselves (drawn with a fixed seed, so the same data makes the same lists; k-means
    would balance the lists a little better and depend on the thread count). None for the
    exact search."""
    if resolved_search(kind, len(codes)) == "exact":
        return None
    lists = max(1, len(codes) // list_size)
    return codes[np.sort(np.random.default_rng(0).choice(len(codes), lists, replace=False))]


def near_duplicate_groups(
    hashes: np.ndarray,
    mirrors: np.ndarray,
    constant: np.ndarray,
    values: np.ndarray,
    max_distance: int,
    run: Callable[[Callable, Any, list], Iterable[dict]] = run_tasks,
    search_kind: SearchKind = "auto",
    windows: np.ndarray | None = None,
) -> np.ndarray:
    """Group id per image: connected components of "hashes within `max_distance` bits, either
    way round" (an image, its mirror or, given `windows` [N, WINDOWS, HASH_BYTES], one of its
    windows, against another image). Constant images only join their exact copies (same value
    everywhere): their hashes are all alike. The N^2 comparisons run in blocks of queries as
    tasks of `run` (`run_tasks` with an engine's settings; by default in this process)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hashes)
    varied = np.flatnonzero(~constant)
    edges = [np.zeros((0, 2), np.int64)]
    if len(varied) > 1:
        codes = np.ascontiguousarray(hashes[varied])
        search = HashSearch(
            codes,
            np.ascontiguousarray(mirrors[varied]),
            max_distance,
            list_centres(codes, search_kind),
        )
        blocks = [
            QueryBlock(start, min(start + QUERY_BLOCK, len(varied)), mirrored)
            for mirrored in (False, True)
            for start in range(0, len(varied), QUERY_BLOCK)
        ]
        if windows is not None:
            queried = windows if len(varied) == n else windows[varied]  # a view when it can
            step = QUERY_BLOCK // WINDOWS  # as many queries per task as a block of hashes
            blocks += [
                QueryBlock(
                    start, min(start + step, len(varied)), windows=queried[start : start + step]
                )
                for start in range(0, len(varied), step)
            ]
        edges += [varied[found["pairs"]] for found in run(search_block, search, blocks)]
    flat = np.flatnonzero(constant)
    for value in np.unique(values[flat]):
        members = flat[values[flat] == value]
        edges.append(np.stack([members[:-1], members[1:]], axis=1))
    pairs = np.concatenate(edges).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return number_by_first_appearance(labels)
