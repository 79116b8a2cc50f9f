"""Near-duplicate grouping beyond the tuning set's 30k images: the default distance as the data
grows, and the inverted file that replaces the exact search (above dedup.EXACT_UP_TO images).

At a fixed distance the other patients within it grow with the data, and chains of them join
into ever larger groups. The default distance therefore shrinks with N
(`dtrain.prepare.dedup.default_distance`: DEFAULT_DISTANCE bits up to 30k images,
BITS_PER_DECADE fewer per tenfold more). On synthetic chest films
(benchmarks/synthetic_patients.py: every original its own patient, 10 % planted copies under new
patient ids):
- tuning set (seed 0, 1M images): recall (all copies, and crops alone), the false-join rate and
  the largest group for each distance, found with the inverted file (the exact search took
  about 15 min here before the windows, whose 16 queries an image make it several times
  that). The slope is chosen so that the distance at this size is the largest whose
  false-join rate is at most 0.1 %, the rule benchmarks/dedup_quality.py applies at 30k;
- report set (seed 1, 300k images): the rule's distance against the fixed default, and the
  inverted file against the exact search at the rule's distance (seconds, and the images whose
  group is not the same set of images as the exact search's).

    python benchmarks/dedup_scale.py [--tune-n 1000000] [--report-n 300000]
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import numpy as np
from common import REPO, Column, Table, write_result
from synthetic_patients import generate

from dtrain.prepare.dedup import (
    DEFAULT_DISTANCE,
    REFERENCE_IMAGES,
    default_distance,
    near_duplicate_groups,
)
from dtrain.prepare.engines import run_tasks
from dtrain.prepare.fingerprints import scan_images
from dtrain.prepare.sources import open_source

MAX_FALSE_JOINS = 0.001


def films(work: Path, n: int, seed: int) -> Path:
    folder = work / f"n{n}_seed{seed}"
    if not (folder / "manifest.csv").is_file():
        generate(folder, n, seed=seed, workers=2, progress=True)
    return folder


class FilmSet:
    """A synthetic set's hashes and what its manifest says of each copy."""

    def __init__(self, folder: Path, workers: int) -> None:
        with open(folder / "manifest.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        index = {r["path"]: i for i, r in enumerate(rows)}
        self.n = len(rows)
        self.original = np.asarray([index[r["copy_of"]] if r["copy_of"] else -1 for r in rows])
        self.kinds = np.asarray([r["copy_kind"] for r in rows])
        source = open_source(str(folder / "manifest.csv"), ["normal", "nodule"], None, None)
        self.scan = scan_images(
            source,
            thumbs=False,
            payload_resize=None,
            skip_bad_images=False,
            engine="process",
            workers=workers,
            address="",
            progress=True,
        )
        self.workers = workers

    def groups(self, distance: int, search: str) -> tuple[np.ndarray, float]:
        s = self.scan

        def run(task, context, specs):
            return run_tasks(task, context, specs, "process", self.workers)

        start = time.perf_counter()
        groups = near_duplicate_groups(
            s.hashes, s.mirrors, s.constant, s.values, distance, run, search, s.windows
        )
        return groups, time.perf_counter() - start

    def measure(self, groups: np.ndarray) -> dict:
        copies = np.flatnonzero(self.original >= 0)
        together = groups[copies] == groups[self.original[copies]]
        originals = np.flatnonzero(self.original < 0)
        per_group = np.bincount(groups[originals], minlength=groups.max() + 1)
        cropped = self.kinds[copies] == "cropped"
        return {
            "recall_all": float(together.mean()),
            "recall_cropped": float(together[cropped].mean()),
            "recall_all_but_cropped": float(together[~cropped].mean()),
            "false_join_rate": float((per_group[groups[originals]] > 1).mean()),
            "largest_group_patients": int(per_group.max()),
            "groups": int(groups.max() + 1),
        }


def regrouped(a: np.ndarray, b: np.ndarray) -> int:
    """Images whose group is not the same set of images under groupings `a` and `b`."""
    size_a = np.bincount(a)[a]
    size_b = np.bincount(b)[b]
    _, pair, size_ab = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True,
                                 return_counts=True)  # fmt: skip
    both = size_ab[pair.ravel()]
    return int(((size_a != both) | (size_b != both)).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tune-n", type=int, default=1_000_000)
    parser.add_argument("--report-n", type=int, default=300_000)
    parser.add_argument("--distances", type=int, nargs="+", default=[20, 22, 24, 26, 28])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "dedup")
    args = parser.parse_args()

    table = Table(
        Column("set", 6, left=True),
        Column("images", 9, "d"),
        Column("search", 8, left=True),
        Column("distance", 8, "d"),
        Column("seconds", 8, ".1f"),
        Column("recall", 7, ".4f"),
        Column("crops", 6, ".3f"),
        Column("false-join", 10, ".4%"),
        Column("largest", 8, "d"),
        Column("regrouped vs exact", 18, "d"),
    )
    table.header()
    tune = FilmSet(films(args.work, args.tune_n, 0), args.workers)
    tuning = {}
    for d in args.distances:
        groups, seconds = tune.groups(d, "inverted")
        tuning[d] = {"seconds": seconds, **tune.measure(groups)}
        m = tuning[d]
        table.row("tune", tune.n, "inverted", d, seconds, m["recall_all"], m["recall_cropped"],
                  m["false_join_rate"], m["largest_group_patients"], None)  # fmt: skip
    allowed = [d for d in args.distances if tuning[d]["false_join_rate"] <= MAX_FALSE_JOINS]
    chosen = max(allowed) if allowed else min(args.distances)
    slope = (DEFAULT_DISTANCE - chosen) / math.log10(args.tune_n / REFERENCE_IMAGES)
    print(f"tuning set: distance {chosen} at {args.tune_n:,} images, {slope:.2f} bits per decade")

    report = FilmSet(films(args.work, args.report_n, 1), args.workers)
    rule = default_distance(report.n)
    reported = {}
    exact_groups, exact_seconds = report.groups(rule, "exact")
    for name, d, search in [
        ("fixed", DEFAULT_DISTANCE, "inverted"),
        ("rule", rule, "inverted"),
        ("rule, exact", rule, "exact"),
    ]:
        if search == "exact":
            groups, seconds = exact_groups, exact_seconds
        else:
            groups, seconds = report.groups(d, search)
        moved = None if d != rule else regrouped(groups, exact_groups)
        reported[name] = {"distance": d, "search": search, "seconds": seconds, "regrouped": moved}
        reported[name].update(report.measure(groups))
        m = reported[name]
        table.row("report", report.n, search, d, seconds, m["recall_all"], m["recall_cropped"],
                  m["false_join_rate"], m["largest_group_patients"], moved)  # fmt: skip
    write_result(
        "dedup_scale",
        {
            "protocol": "slope chosen on the tuning set (seed 0), reported on seed 1",
            "max_false_join_rate": MAX_FALSE_JOINS,
            "tune": {"n": tune.n, "by_distance": tuning},
            "chosen_distance_at_tune_n": chosen,
            "bits_per_decade_measured": slope,
            "report": {"n": report.n, "rule_distance": rule, "by_setting": reported},
            "workers": args.workers,
        },
    )


if __name__ == "__main__":
    main()
