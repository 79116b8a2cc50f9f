"""What a run at scale needs, from the per-image costs measured by the other benchmarks: shard
count and size, per-node read bandwidth, loader workers per GPU, the all-gather volume of the
global contrastive negatives against the gradient all-reduce, and the step time below which the
data path becomes the bottleneck.

    python benchmarks/scale_model.py [--images 1000000] [--gpus 64] [--gpus-per-node 8]

Measured here: bytes per sample in the prepared shards (the embedded Br35H set as `dtrain
prepare` stores it), the loader's images/s per worker (results/loader.json), the parameter count
of the model in results/step_breakdown_<device>.json and its projection size (gradient and
gather volumes follow from them exactly). A GPU's training rate is measured only where a GPU
check ran (a results/step_breakdown_<gpu>.json); otherwise the table spans assumed per-GPU rates,
and says so. Writes benchmarks/results/scale_model.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import RESULTS, Column, Table, preset, write_result

from dtrain.config import load_config
from dtrain.dataset.format import read_dataset_json
from dtrain.methods.model import build_model
from dtrain.prepare import PrepareConfig, prepare

ASSUMED_GPU_RATES = (1000, 3000, 10000)  # images/s per GPU, when no GPU measured one
MAX_SHARD_BYTES = 1e9  # webdataset's advice: shards of 100 MB - 1 GB


def bytes_per_sample(dataset: Path) -> float:
    meta = read_dataset_json(str(dataset))
    shards = meta["shards"].values()
    return sum(s["bytes"] for s in shards) / sum(s["count"] for s in shards)


def gpu_rate_measured() -> tuple[float, str] | None:
    """The method's end-to-end images/s from a step breakdown that ran on a GPU, if any."""
    for path in sorted(RESULTS.glob("step_breakdown_*.json")):
        result = json.loads(path.read_text())
        if result["machine"].get("gpus") and "iam/eager" in result["rows"]:
            return result["rows"]["iam/eager"]["images_per_s"], result["device"]
    return None


def shard_plan(total_bytes: float, readers: int) -> tuple[int, float]:
    """Shard count and size: at least one shard per reader (GPU x loader worker: webdataset
    splits by shard) and none over 1 GB. Shards under 100 MB are the price of that split;
    `data.resampled=true` (readers draw shards with replacement) lifts it."""
    count = max(readers, math.ceil(total_bytes / MAX_SHARD_BYTES))
    count = math.ceil(count / readers) * readers  # the same number for every reader
    return count, total_bytes / count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--data", help="a dtrain prepare folder (default: the embedded set)")
    args = parser.parse_args()

    device_results = sorted(RESULTS.glob("step_breakdown_cpu*.json")) or sorted(
        RESULTS.glob("step_breakdown_*.json")
    )
    if not device_results or not (RESULTS / "loader.json").is_file():
        raise SystemExit(
            "needs results/step_breakdown_<device>.json and results/loader.json: run "
            "`python benchmarks/run.py --only step_breakdown loader` first"
        )
    breakdown = json.loads(device_results[0].read_text())
    loader = json.loads((RESULTS / "loader.json").read_text())
    per_worker = loader["images_per_s"]["dtrain loader, 1 workers"]

    data = Path(args.data) if args.data else prepare(PrepareConfig(progress=False))
    sample_bytes = bytes_per_sample(data)
    config = load_config(
        preset("iam"), [f"model.backbone={breakdown['backbone']}", "model.pretrained=false"]
    )
    meta = read_dataset_json(str(data))
    net = build_model(config.model, "iam", len(meta["classes"]), meta["images"]["channels"])
    params = sum(p.numel() for p in net.parameters())
    batch, dim, world = breakdown["batch_size"], config.model.projection_dim, args.gpus
    # ring all-reduce of fp32 gradients: each rank sends (and receives) 2 (N-1)/N of them
    allreduce = 2 * (world - 1) / world * params * 4
    # each rank receives every other rank's [B, 2d + 1] fp32 rows, and in the backward sends
    # the gradient of its share back (reduce-scatter of the same size)
    gather = 2 * (world - 1) * batch * (2 * dim + 1) * 4

    measured = gpu_rate_measured()
    rates = [measured[0]] if measured else list(ASSUMED_GPU_RATES)
    source = f"measured on {measured[1]}" if measured else "assumed: no GPU was lent"
    nodes = math.ceil(args.gpus / args.gpus_per_node)
    rows = []
    table = Table(
        Column("GPU img/s", 9, ".0f"),
        Column("source", 12, left=True),
        Column("workers/GPU", 11, "d"),
        Column("node MB/s", 9, ".0f"),
        Column("shards", 7, "d"),
        Column("shard MB", 8, ".0f"),
        Column("step ms", 8, ".1f"),
        Column("data-bound <", 12, ".1f"),
    )
    table.header()
    for rate in rates:
        workers = math.ceil(rate / per_worker)
        shards, shard_bytes = shard_plan(args.images * sample_bytes, args.gpus * workers)
        row = {
            "gpu_images_per_s": rate,
            "gpu_rate_source": source,
            "loader_workers_per_gpu": workers,
            "node_read_MB_s": args.gpus_per_node * rate * sample_bytes / 1e6,
            "shards": shards,
            "shard_MB": shard_bytes / 1e6,
            "step_ms": 1e3 * batch / rate,
            # at `workers` per GPU the loader feeds batch images in this long: a faster step
            # waits for data
            "data_bound_below_step_ms": 1e3 * batch / (workers * per_worker),
        }
        rows.append(row)
        table.row(
            rate,
            "measured" if measured else "assumed",
            workers,
            row["node_read_MB_s"],
            shards,
            row["shard_MB"],
            row["step_ms"],
            row["data_bound_below_step_ms"],
        )
    print(
        f"per step and GPU: contrastive all-gather {gather / 1e6:.2f} MB vs gradient all-reduce "
        f"{allreduce / 1e6:.1f} MB ({gather / allreduce:.1%}); {params / 1e6:.1f} M parameters"
    )
    write_result(
        "scale_model",
        {
            "images": args.images,
            "gpus": args.gpus,
            "gpus_per_node": args.gpus_per_node,
            "nodes": nodes,
            "batch_per_gpu": batch,
            "backbone": breakdown["backbone"],
            "image_size": breakdown["image_size"],
            "bytes_per_sample": sample_bytes,
            "dataset_GB": args.images * sample_bytes / 1e9,
            "loader_images_per_s_per_worker": per_worker,
            "loader_source": f"measured: results/loader.json on {loader['machine']['cpu']}",
            "parameters": params,
            "projection_dim": dim,
            "allreduce_MB_per_step": allreduce / 1e6,
            "gather_MB_per_step": gather / 1e6,
            "gather_vs_allreduce": gather / allreduce,
            "rows": rows,
            "inputs": [str(device_results[0].name), "loader.json"],
        },
    )


if __name__ == "__main__":
    main()
