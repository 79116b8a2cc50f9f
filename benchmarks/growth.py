"""How time and memory grow with the dataset, from preparing the images to relabelling them: for
each size a synthetic set of 64 px chest films (benchmarks/synthetic_patients.py, cached under
--work), then each step in its own process, timed, with its peak RSS.

    python benchmarks/growth.py [--sizes 10000 100000 1000000] [--work data/growth]
    python benchmarks/growth.py --sizes 2000 5000        # a quick look

Steps: `prepare` (manifest.csv -> shards), `index` (`dtrain index` over the prepared shards, as
for shards written elsewhere), `train` (one epoch of the real trainer with the cheapest settings:
plain CE, timm's test_resnet at 16 px, one loader worker, no weight average; val and test scored,
the report written), `scores` (the label-score report of that run again: its checkpoint's score
rows ranked and written as label_scores.parquet), `review` (`dtrain review --top 200`) and
`relabel` (`dtrain relabel` of a review.csv with 5 corrected rows).

Peak RSS is `ru_maxrss` of the step's process as `os.wait4` returns it: the largest of that
process and every descendant it waited for (loader workers, pools), not their sum. Per-image
figures divide by the dataset's size (every split). Prints a table and, for each size, the
per-image time and memory against the smallest size (target: at most 1.2x from 10k up); writes
benchmarks/results/growth.json (after each size, so a long run leaves what it measured).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, Column, Table, preset, write_result

DEFAULT_SIZES = [10_000, 100_000, 1_000_000]
SIDE, COPY_FRACTION, SEED = 64, 0.1, 0
CLASSES = "normal,nodule"  # synthetic_patients' labels, in its index order
REVIEW_TOP, CORRECTED = 200, 5
TARGET_RATIO = 1.2
# the cheapest settings that still run the real trainer end to end
TRAIN_SETTINGS = [
    "model.backbone=test_resnet",
    "data.image_size=16",
    "data.batch_size=256",
    "data.num_workers=1",
    "train.epochs=1",
    "method.score_epochs=1",
    "train.ema_epochs=0",
    "train.select=last",
    "train.progress=false",
    "train.trackers=[]",
]
PREPARE_SETTINGS = ["--classes", CLASSES, "--noise", "symmetric", "--noise-rate", "0.2"]
STEPS = ("prepare", "index", "train", "scores", "review", "relabel")

# the `scores` step: what the trainer's report does with the score rows, from the checkpoint
SCORE_REPORT = """
import sys, time
from pathlib import Path
import pyarrow.parquet as pq
from dtrain.train.checkpoint import load_checkpoint
from dtrain.train.label_scores import ScoreAccumulator
from dtrain.train.report import label_scores
run, manifest, out = map(Path, sys.argv[1:])
scores = ScoreAccumulator()
scores.load_state_dict(load_checkpoint(run / "last.pt")["scores"])
ranked, aurocs = label_scores(scores.table, manifest)
pq.write_table(ranked, out)
print(f"{ranked.num_rows} rows ranked, AUROC {aurocs}")
"""


def dtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtrain", *args]


def measure(command: list[str], log: Path) -> dict:
    """Seconds and peak RSS (MB) of `command`, its output in `log`; exits naming the log when
    the command fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}  # KiB on Linux


def synthetic_set(work: Path, n: int, workers: int) -> tuple[Path, float | None]:
    """The cached synthetic set of `n` images (its manifest.csv is written last: a set without
    one was cut short and is made again), and the seconds it took to make, None if cached."""
    from synthetic_patients import generate

    folder = work / f"synthetic_{n}_side{SIDE}_seed{SEED}"
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        return manifest, None
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    generate(folder, n, side=SIDE, copy_fraction=COPY_FRACTION, seed=SEED, workers=workers)
    return manifest, time.perf_counter() - start


def split_patterns(dataset: Path) -> dict[str, str]:
    """A brace pattern per split naming its shards (`train-{000000..000069}.tar`), as a user
    would pass them to `dtrain index`; `::`-joined names where the numbering has gaps."""
    meta = json.loads((dataset / "dataset.json").read_text())
    patterns = {}
    for split in ("train", "val", "test"):
        names = sorted(n for n, info in meta["shards"].items() if info["split"] == split)
        if not names:
            continue
        numbers = [int(n.removeprefix(f"{split}-").removesuffix(".tar")) for n in names]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            patterns[split] = str(dataset / f"{split}-{{{numbers[0]:06d}..{numbers[-1]:06d}}}.tar")
        else:
            patterns[split] = "::".join(str(dataset / n) for n in names)
    return patterns


def corrected_review(review_csv: Path, out: Path, classes: list[str], count: int) -> Path:
    """A copy of `review_csv` with the first `count` rows relabelled to the other class."""
    with open(review_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[:count]:
        row["corrected_label"] = classes[1 - classes.index(row["given_label"])]
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out


def run_size(n: int, work: Path, workers: int) -> tuple[list[dict], dict]:
    """Every step at one size: its rows (one per step) and what else the size's runs said."""
    manifest, generated = synthetic_set(work, n, workers)
    folder, logs = work / f"runs_{n}", work / f"runs_{n}" / "logs"
    shutil.rmtree(folder, ignore_errors=True)  # every step writes its output anew
    prepared, indexed, run = folder / "prepared", folder / "indexed", folder / "run"
    relabelled, scores_out = folder / "relabelled", folder / "label_scores_again.parquet"
    commands = {
        "prepare": lambda: dtrain(
            "prepare", str(manifest), "--out", str(prepared), *PREPARE_SETTINGS, "--no-progress"
        ),
        "index": lambda: dtrain(
            "index",
            *(
                f"--{split}={pattern}" if split != "train" else pattern
                for split, pattern in split_patterns(prepared).items()
            ),
            "--classes",
            CLASSES,
            "--out",
            str(indexed),
            "--no-progress",
        ),
        "train": lambda: dtrain(
            "train",
            "--config",
            str(preset("ce")),
            f"data.path={prepared}",
            f"train.run_dir={run}",
            *TRAIN_SETTINGS,
        ),
        "scores": lambda: [
            sys.executable,
            "-c",
            SCORE_REPORT,
            str(run),
            str(prepared / "manifest.parquet"),
            str(scores_out),
        ],
        "review": lambda: dtrain("review", str(run), "--top", str(REVIEW_TOP), "--no-progress"),
        "relabel": lambda: dtrain(
            "relabel",
            str(prepared),
            str(
                corrected_review(
                    run / "review" / "review.csv",
                    folder / "review_corrected.csv",
                    CLASSES.split(","),
                    CORRECTED,
                )
            ),
            "--out",
            str(relabelled),
            "--no-progress",
        ),
    }
    rows = []
    for step in STEPS:
        result = measure(commands[step](), logs / f"{step}.log")
        rows.append(
            {
                "size": n,
                "step": step,
                **result,
                "us_per_image": result["seconds"] / n * 1e6,
                "kb_per_image": result["peak_rss_mb"] * 1024 / n,
                # the machine is shared: how busy it was (1-minute load) when the step ended
                "load_after": os.getloadavg()[0],
            }
        )
    epoch = next(
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "epoch"
    )
    meta = json.loads((prepared / "dataset.json").read_text())
    extra = {
        "generated_seconds": generated,
        "splits": {s: info["count"] for s, info in meta["splits"].items()},
        "shards": len(meta["shards"]),
        "train_epoch_images_per_s": epoch["images_per_s"],
        "relabel_said": next(
            line
            for line in (logs / "relabel.log").read_text().splitlines()
            if line.startswith("wrote")
        ),
    }
    return rows, extra


def ratios(rows: list[dict]) -> list[dict]:
    """Per-image time and peak memory of each row against the same step at the smallest size,
    and the marginal cost of the images added since the size before (what the fixed start-up,
    a few seconds and the imports' few hundred MB, hides at small sizes)."""
    sizes = sorted({r["size"] for r in rows})
    at = {(r["size"], r["step"]): r for r in rows}
    out = []
    for r in rows:
        base = at.get((sizes[0], r["step"]))
        before = at.get((sizes[max(sizes.index(r["size"]) - 1, 0)], r["step"]))
        if base is None or r["size"] == sizes[0]:
            continue
        added = r["size"] - before["size"]
        out.append(
            {
                "size": r["size"],
                "step": r["step"],
                "time_ratio": r["us_per_image"] / base["us_per_image"],
                "memory_ratio": r["kb_per_image"] / base["kb_per_image"],
                "marginal_us_per_image": (r["seconds"] - before["seconds"]) / added * 1e6,
                "marginal_kb_per_image": (r["peak_rss_mb"] - before["peak_rss_mb"]) * 1024 / added,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    parser.add_argument("--work", type=Path, default=REPO / "data" / "growth")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="to generate")
    parser.add_argument("--out", help="result file (default: benchmarks/results/growth.json)")
    args = parser.parse_args()
    work = args.work.resolve()

    table = Table(
        Column("size", 9, ",d"),
        Column("step", 8, left=True),
        Column("seconds", 9, ".1f"),
        Column("µs/image", 9, ".1f"),
        Column("peak MB", 8, ".0f"),
        Column("KB/image", 9, ".2f"),
    )
    table.header()
    rows, runs = [], {}
    for n in sorted(args.sizes):
        size_rows, runs[n] = run_size(n, work, args.workers)
        for r in size_rows:
            table.row(
                n, r["step"], r["seconds"], r["us_per_image"], r["peak_rss_mb"], r["kb_per_image"]
            )
        rows += size_rows
        result = {
            "sizes": sorted(runs),
            "rows": rows,
            "ratios": ratios(rows),
            "runs": runs,
            "target_ratio": TARGET_RATIO,
            "settings": {
                "side": SIDE,
                "copy_fraction": COPY_FRACTION,
                "prepare": PREPARE_SETTINGS,
                "train": ["--config configs/ce.yaml", *TRAIN_SETTINGS],
                "review_top": REVIEW_TOP,
                "corrected": CORRECTED,
            },
            "machine": {
                "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
            },
        }
        write_result("growth", result, args.out)

    print(f"\nper image, against {min(args.sizes):,} images (target <= {TARGET_RATIO}x), and the")
    print("marginal cost of the images added since the size before:")
    table = Table(
        Column("size", 9, ",d"),
        Column("step", 8, left=True),
        Column("time x", 7, ".2f"),
        Column("memory x", 9, ".2f"),
        Column("+µs/image", 10, ".1f"),
        Column("+KB/image", 10, ".3f"),
    )
    table.header()
    for r in ratios(rows):
        table.row(
            r["size"],
            r["step"],
            r["time_ratio"],
            r["memory_ratio"],
            r["marginal_us_per_image"],
            r["marginal_kb_per_image"],
        )


if __name__ == "__main__":
    main()
