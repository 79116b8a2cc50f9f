"""Images/s of the streaming loader (decode + two augmented views, 64 px) at 0, 1 and 2 workers,
against decoding the same JPEGs with PIL in a plain loop; and with the shards read through a
`pipe:` command (webdataset's way to stream from remote storage: `pipe:curl -s URL`,
`pipe:aws s3 cp URL -`), here `pipe:cat FILE`, to show what the extra process and pipe cost.
Ratios come from one run.

    python benchmarks/loader_throughput.py [--data DIR] [--repeats 3]

Prints a table and writes benchmarks/results/loader.json.
"""

from __future__ import annotations

import argparse
import io
import shlex
import tarfile
import time
from pathlib import Path

from common import RESULTS, Column, Table, write_result
from PIL import Image

from dtrain.dataset.format import read_dataset_json, shard_dir, shard_entries, split_urls
from dtrain.dataset.loader import make_loader
from dtrain.prepare import PrepareConfig, prepare


def jpeg_bytes(urls: list[str]) -> list[bytes]:
    images = []
    for url in urls:
        with tarfile.open(url) as tar:
            images += [
                tar.extractfile(m).read()
                for m in tar.getmembers()
                if m.name.endswith((".jpg", ".png"))
            ]
    return images


def plain_decode(urls: list[str], size: int, draft: bool) -> float:
    """Images/s of: read the shards, decode each image with PIL, grayscale, resize to size."""
    start = time.perf_counter()
    images = jpeg_bytes(urls)
    for data in images:
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft("L", (size, size))
        image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return len(images) / (time.perf_counter() - start)


def loader_rate(
    urls: list[str], size: int, workers: int, batch_size: int, pipe: bool = False
) -> float:
    """Images/s over one full epoch, worker start-up included (as a trainer sees it); with
    `pipe`, each shard is read from `cat`'s output (no checksums: the URLs are not those
    listed in dataset.json)."""
    options = {}
    if pipe:
        meta = read_dataset_json(shard_dir(urls[0]))
        listed = shard_entries(meta, urls)
        counts = {f"pipe:cat {shlex.quote(url)}": listed[url]["count"] for url in urls}
        urls = list(counts)
        options = {
            "shard_counts": counts,
            "channels": meta["images"]["channels"],
            "num_classes": len(meta["classes"]),
        }
    loader = make_loader(
        urls,
        train=True,
        batch_size=batch_size,
        image_size=size,
        num_workers=workers,
        rank=0,
        world_size=1,
        **options,
    )
    start = time.perf_counter()
    seen = sum(int(batch["valid"].sum()) for batch in loader)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a dtrain prepare folder (default: the embedded set)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per row")
    parser.add_argument("--out", default=str(RESULTS / "loader.json"))
    args = parser.parse_args()
    data = Path(args.data) if args.data else prepare(PrepareConfig(progress=False))
    urls = split_urls(data, "train")

    rows = {}

    def best(name, fn):
        rows[name] = max(fn() for _ in range(args.repeats))

    best("PIL decode + resize, plain loop", lambda: plain_decode(urls, args.size, draft=False))
    for workers in (0, 1, 2):
        best(
            f"dtrain loader, {workers} workers",
            lambda w=workers: loader_rate(urls, args.size, w, args.batch_size),
        )
    for workers in (1, 2):
        best(
            f"dtrain loader, {workers} workers, pipe:cat shards",
            lambda w=workers: loader_rate(urls, args.size, w, args.batch_size, pipe=True),
        )
    best(
        "PIL decode + resize, plain loop (again)",
        lambda: plain_decode(urls, args.size, draft=False),
    )
    best(
        "PIL decode with JPEG draft + resize (reference)",
        lambda: plain_decode(urls, args.size, draft=True),
    )

    baseline = (
        rows["PIL decode + resize, plain loop"] + rows["PIL decode + resize, plain loop (again)"]
    ) / 2
    table = Table(
        Column("pipeline", 50, left=True),
        Column("images/s", 10, ".0f"),
        Column("x plain", 8, ".2f"),
    )
    table.header()
    for name, rate in rows.items():
        table.row(name, rate, rate / baseline)
    ratio = rows["dtrain loader, 1 workers"] / baseline
    print(
        f"target: loader at 1 worker >= 0.9x plain decode -> {ratio:.2f}x "
        f"({'met' if ratio >= 0.9 else 'missed'})"
    )
    result = {
        "images": len(jpeg_bytes(urls)),
        "size": args.size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "images_per_s": rows,
        "plain_baseline": baseline,
        "ratio_1_worker": ratio,
        "pipe_ratio": {
            w: rows[f"dtrain loader, {w} workers, pipe:cat shards"]
            / rows[f"dtrain loader, {w} workers"]
            for w in (1, 2)
        },
        "target_ratio": 0.9,
    }
    write_result("loader", result, args.out)


if __name__ == "__main__":
    main()
