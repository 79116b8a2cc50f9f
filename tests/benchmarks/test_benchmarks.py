"""The throughput benchmarks' own arithmetic: the step breakdown's profiler attribution (which
ops, forward and backward, belong to the contrastive and mixup ranges), its phase split and
summary and its plan of configs; the runner's summary rows and the README sections it
generates, from the results in the repository. The timings themselves are not tested (benchmarks
measure, tests check)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from common import RESULTS  # noqa: E402
from performance import update_readme  # noqa: E402
from run import BENCHMARKS, headline  # noqa: E402
from step_breakdown import configs, range_shares, split_phases, summarise  # noqa: E402


def _profile(body) -> list:
    """Forward and backward of `body`, profiled four times after one warm-up (CPU times are
    wall times: summing several steps evens out a busy machine)."""
    torch.manual_seed(0)
    body().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            with record_function("step.forward"):
                loss = body()
            loss.backward()
    return prof.events()


def test_a_heavy_range_gets_most_of_forward_and_backward():
    w = torch.randn(384, 384, requires_grad=True)
    x = torch.randn(384, 384)

    def body():
        h = x * w  # small outside
        with record_function("dtrain.contrastive"):
            for _ in range(12):
                h = h @ w  # heavy inside
        return h.mean()

    shares = range_shares(_profile(body), cuda=False)
    fwd, bwd = shares["contrastive"]
    assert 0.6 < fwd < 1.0 and 0.6 < bwd < 1.0
    assert shares["mixup"] is None  # no such range: not measured, not zero


def test_a_range_without_graph_nodes_claims_no_backward():
    """An op on tensors that need no gradient makes no node, but records the sequence number
    of the next op that does: that op (outside the range) must not count as the range's."""
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(512, 512)

    def body():
        with record_function("dtrain.mixup"):
            mixed = 0.5 * x + 0.5 * x.flip(0)  # no grad: no node
        h = mixed @ w  # heavy, outside, makes the next node
        for _ in range(4):
            h = h @ w
        return h.square().mean()

    fwd, bwd = range_shares(_profile(body), cuda=False)["mixup"]
    assert bwd == 0.0
    assert fwd < 0.5


def test_split_phases_moves_the_ranges_out_of_forward_and_backward():
    steps = [{"data_wait": 1.0, "forward": 10.0, "backward": 20.0, "optimizer": 2.0}]
    shares = {"contrastive": (0.1, 0.25), "mixup": (0.2, 0.0)}
    (row,) = split_phases(steps, shares)
    assert row["contrastive"] == pytest.approx(1.0 + 5.0)
    assert row["mixup"] == pytest.approx(2.0)
    assert row["forward"] == pytest.approx(10.0 - 1.0 - 2.0)
    assert row["backward"] == pytest.approx(20.0 - 5.0)
    assert sum(row.values()) == pytest.approx(33.0)  # nothing lost or counted twice


def test_summary_takes_medians_and_shares_that_add_up():
    steps = [
        {"data_wait": 0.001 * i, "forward": 0.1, "backward": 0.2, "optimizer": 0.01}
        for i in range(1, 6)
    ]
    run = {"steps": steps, "shares": {"contrastive": (0.5, 0.5), "mixup": (0.0, 0.0)}}
    out = summarise([{**run, "images_per_s": 100.0, "peak_mib": 10.0}], batch_size=64)
    assert out["phases"]["data_wait"]["ms"] == pytest.approx(3.0)
    assert out["phases"]["contrastive"]["ms"] == pytest.approx(150.0)
    assert sum(p["share"] for p in out["phases"].values()) == pytest.approx(1.0)
    assert out["step_ms"] == pytest.approx(313.0)
    assert out["timed_images_per_s"] == pytest.approx(64 / 0.313)


def test_variants_apply_to_ce_and_the_method_and_torch_mixup_needs_a_gpu():
    methods = ["ce", "iam", "gce"]
    cpu = configs(methods, ["eager", "compile", "torch_mixup"], cuda=False)
    assert cpu == [
        ("ce", "eager"),
        ("iam", "eager"),
        ("gce", "eager"),
        ("ce", "compile"),
        ("iam", "compile"),
    ]
    gpu = configs(methods, ["torch_mixup"], cuda=True)
    assert gpu[-1] == ("iam", "torch_mixup") and ("ce", "torch_mixup") not in gpu


def test_every_result_in_the_repository_makes_a_summary_and_the_readme(tmp_path):
    """The summary rows and the README sections come from the JSON results as committed (files
    written by older versions of the scripts included)."""
    seen = 0
    for name, bench in BENCHMARKS.items():
        for path in RESULTS.glob(bench.result.format(device="*")):
            rows = headline(name, json.loads(path.read_text()))
            assert rows and all(len(row) == 3 for row in rows), path
            seen += 1
    assert seen >= 3
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n<!-- generated: performance -->\nold\n<!-- end: performance -->\nkept\n"
        "<!-- generated: at-scale -->\n<!-- end: at-scale -->\n"
    )
    update_readme(readme)
    text = readme.read_text()
    assert "old" not in text and "kept" in text
    assert "**Loader**" in text and "| pipeline | images/s | × plain |" in text


def test_a_readme_without_the_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to fill\n")
    with pytest.raises(SystemExit, match="generated: performance"):
        update_readme(readme)
    assert readme.read_text() == "# nothing to fill\n"


def test_growth_compares_per_image_and_prices_each_image_added(tmp_path):
    from growth import ratios, split_patterns

    def row(size: int, seconds: float, peak_mb: float) -> dict:
        per = {"us_per_image": seconds / size * 1e6, "kb_per_image": peak_mb * 1024 / size}
        return {"size": size, "step": "relabel", "seconds": seconds, "peak_rss_mb": peak_mb, **per}

    rows = [row(10, 2.0, 100.0), row(100, 2.9, 100.9), row(1000, 20.0, 200.0)]
    out = ratios(rows)
    assert [r["size"] for r in out] == [100, 1000]
    assert out[0]["time_ratio"] == pytest.approx(0.29 / 2.0)
    assert out[0]["marginal_us_per_image"] == pytest.approx(0.9 / 90 * 1e6)
    assert out[1]["marginal_us_per_image"] == pytest.approx(17.1 / 900 * 1e6)  # since 100
    assert out[1]["marginal_kb_per_image"] == pytest.approx(99.1 * 1024 / 900)
    assert out[1]["memory_ratio"] == pytest.approx((200 / 1000) / (100 / 10))

    shards = {f"train-{i:06d}.tar": {"split": "train"} for i in range(3)}
    shards |= {"val-000000.tar": {"split": "val"}, "val-000002.tar": {"split": "val"}}
    (tmp_path / "dataset.json").write_text(json.dumps({"shards": shards}))
    assert split_patterns(tmp_path) == {
        "train": f"{tmp_path}/train-{{000000..000002}}.tar",
        "val": f"{tmp_path}/val-000000.tar::{tmp_path}/val-000002.tar",  # a gap: listed
    }
