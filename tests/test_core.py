"""The refactored core against values worked out by hand (or in plain Python inside the test):
the mislabel ranking, score accumulation, the learning-rate schedule, DeepSpeed config
resolution, NT-Xent, the group attention's padding mask, Co-teaching, the method registry and
presets, input mixup's reported logits, and config coercion."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from dtrain.config import load_config, operational_keys
from dtrain.errors import ConfigError
from dtrain.methods import losses
from dtrain.methods.model import GroupAttention, build_model
from dtrain.methods.registry import METHODS, MethodName
from dtrain.methods.steps import forget_rate, training_step
from dtrain.train.deepspeed_config import resolve_deepspeed_config
from dtrain.train.label_scores import ScoreAccumulator, ScoreRow
from dtrain.train.lr_schedule import lr_factor
from dtrain.train.report import label_scores

CONFIGS = Path(__file__).parent.parent / "configs"
NO_MANIFEST = Path("/nonexistent/dtrain-test/manifest.parquet")


# ---------------------------------------------------------------------------------------------
# 1. label_scores: direction, ranking, AUROC


def pair_auroc(scores: list[float], positives: list[bool]) -> float:
    """AUROC as the fraction of (positive, negative) pairs ordered right (ties count 1/2)."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def row(key, noisy, loss, attention=None, label=0, predicted=0, epochs=2) -> ScoreRow:
    """A row seen in `epochs` epochs with mean loss `loss` and mean attention `attention`
    (None: never scored by the attention)."""
    has = attention is not None
    return ScoreRow(
        key,
        label,
        noisy,
        predicted,
        loss_sum=loss * epochs,
        count=epochs,
        attention_sum=(attention * epochs) if has else 0.0,
        attention_count=epochs if has else 0,
    )


def as_dict(rows: list[ScoreRow]) -> dict[str, ScoreRow]:
    return {r.key: r for r in rows}


# suspicion = 1 - attention: a 0.1, b 0.8, c 0.4, d 0.6 -> b, d, c, a
# noisy b (0.8), c (0.4) vs clean a (0.1), d (0.6): b>a, b>d, c>a, c<d -> 3/4
# loss: noisy b 2.0, c 0.3 vs clean a 0.5, d 1.0: b>a, b>d, c<a, c<d -> 2/4
TINY = [
    row("a", False, 0.5, 0.9),
    row("b", True, 2.0, 0.2),
    row("c", True, 0.3, 0.6),
    row("d", False, 1.0, 0.4),
]


def test_label_scores_rank_low_attention_first_and_aurocs_by_hand():
    out, aurocs = label_scores(as_dict(TINY), NO_MANIFEST)
    assert [r["key"] for r in out] == ["b", "d", "c", "a"]
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    by_key = {r["key"]: r for r in out}
    for key, suspicion in {"a": 0.1, "b": 0.8, "c": 0.4, "d": 0.6}.items():
        assert by_key[key]["score"] == pytest.approx(suspicion)
        assert by_key[key]["attention_score"] == pytest.approx(1 - suspicion)
        assert by_key[key]["source"] == ""  # no manifest: no sources
    assert set(aurocs) == {"loss", "attention"}
    assert aurocs["attention"] == pytest.approx(0.75)
    assert aurocs["loss"] == pytest.approx(0.5)
    # the plain-Python pair count agrees
    assert aurocs["attention"] == pytest.approx(
        pair_auroc([0.1, 0.8, 0.4, 0.6], [False, True, True, False])
    )


def test_label_scores_without_attention_rank_by_loss_high_first():
    rows = [row(r.key, r.is_noisy, r.loss_score) for r in TINY]  # attention_count 0 everywhere
    out, aurocs = label_scores(as_dict(rows), NO_MANIFEST)
    assert [r["key"] for r in out] == ["b", "d", "a", "c"]  # losses 2.0, 1.0, 0.5, 0.3
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    assert [r["score"] for r in out] == pytest.approx([2.0, 1.0, 0.5, 0.3])
    assert all(math.isnan(r["attention_score"]) for r in out)
    assert set(aurocs) == {"loss"}
    assert aurocs["loss"] == pytest.approx(0.5)


def test_label_scores_planted_noise_is_found():
    """20 of 100 labels wrong, with low attention and high loss: both AUROCs are high."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(100):
        noisy = i % 5 == 0
        attention = rng.uniform(0.05, 0.45) if noisy else rng.uniform(0.35, 0.95)
        loss = rng.uniform(1.0, 3.0) if noisy else rng.uniform(0.05, 1.2)
        rows.append(row(f"k{i:03d}", noisy, float(loss), float(attention)))
    out, aurocs = label_scores(as_dict(rows), NO_MANIFEST)
    assert aurocs["attention"] > 0.9 and aurocs["loss"] > 0.9
    noisy = [r.is_noisy for r in rows]
    assert aurocs["attention"] == pytest.approx(
        pair_auroc([1 - r.attention_score for r in rows], noisy)
    )
    assert aurocs["loss"] == pytest.approx(pair_auroc([r.loss_score for r in rows], noisy))
    assert [r["rank"] for r in out] == list(range(1, 101))
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    assert sum(r["is_noisy"] for r in out[:20]) >= 15  # the planted ones lead


def test_label_scores_unscored_attention_rows_rank_last(tmp_path):
    """Rows the attention never scored (attention_count 0, NaN attention) among scored ones: they
    rank after every scored row, the attention AUROC counts only the scored rows, the loss AUROC
    counts all; the manifest gives each key its source."""
    unscored = [row("e", True, 9.0), row("f", False, 0.1)]  # e has the highest loss of all
    rows = as_dict([*TINY, *unscored])
    manifest = tmp_path / "manifest.parquet"
    keys = ["a", "b", "c", "d", "e", "f", "other"]
    pq.write_table(pa.table({"key": keys, "source": [f"img/{k}.png" for k in keys]}), manifest)
    out, aurocs = label_scores(rows, manifest)
    assert [r["key"] for r in out[:4]] == ["b", "d", "c", "a"]
    assert {r["key"] for r in out[4:]} == {"e", "f"}
    assert all(math.isnan(r["score"]) for r in out[4:])
    assert [r["rank"] for r in out] == [1, 2, 3, 4, 5, 6]
    assert aurocs["attention"] == pytest.approx(0.75)  # as without e and f
    # noisy b 2.0, c 0.3, e 9.0 vs clean a 0.5, d 1.0, f 0.1: b 3 wins, c 1 win, e 3 wins -> 7/9
    assert aurocs["loss"] == pytest.approx(7 / 9)
    assert {r["key"]: r["source"] for r in out} == {k: f"img/{k}.png" for k in "abcdef"}


# ---------------------------------------------------------------------------------------------
# 2. ScoreAccumulator


def add_batches(acc: ScoreAccumulator) -> None:
    # batch 1: no attention (warm-up); the padding row repeats key "a" with absurd values
    acc.add(
        ["a", "b", "c", "a"],
        torch.tensor([True, True, True, False]),
        torch.tensor([0, 1, 1, 0]),  # label
        torch.tensor([0, 0, 1, 1]),  # clean label: b is noisy
        torch.tensor([0.5, 1.0, 2.0, 100.0]),
        torch.tensor([0, 1, 1, 2]),
        None,
    )
    # batch 2: with attention; the padding row has its own key
    acc.add(
        ["b", "c", "d", "pad"],
        torch.tensor([True, True, True, False]),
        torch.tensor([1, 1, 0, 0]),
        torch.tensor([0, 1, 0, 0]),
        torch.tensor([0.25, 0.75, 1.5, 50.0]),
        torch.tensor([0, 1, 0, 2]),
        torch.tensor([0.5, 0.25, 0.75, 0.125]),
    )


EXPECTED_ROWS = {
    "a": ScoreRow("a", 0, False, 0, 0.5, 1, 0.0, 0),
    "b": ScoreRow("b", 1, True, 0, 1.25, 2, 0.5, 1),  # predicted: the last one (0)
    "c": ScoreRow("c", 1, False, 1, 2.75, 2, 0.25, 1),
    "d": ScoreRow("d", 0, False, 0, 1.5, 1, 0.75, 1),
}


def test_score_accumulator_sums_counts_and_skips_padding():
    acc = ScoreAccumulator()
    add_batches(acc)
    assert acc.rows == {}  # nothing merged yet
    acc.merge()
    assert acc.rows == EXPECTED_ROWS
    assert acc.rows["b"].loss_score == 0.625 and acc.rows["b"].attention_score == 0.5
    assert math.isnan(acc.rows["a"].attention_score)
    # a second merge adds to the first
    add_batches(acc)
    acc.merge()
    assert acc.rows["b"].loss_sum == 2.5 and acc.rows["b"].count == 4
    assert acc.rows["b"].attention_count == 2 and acc.rows["a"].count == 2
    assert "pad" not in acc.rows


def test_score_accumulator_leaves_out_the_samples_of_a_skipped_step():
    """A non-finite step is skipped; its samples' losses are no evidence and would make every
    later score (and the report's AUROC) NaN."""
    acc = ScoreAccumulator()
    add_batches(acc)
    acc.add(
        ["a", "b"],
        torch.tensor([True, True]),
        torch.tensor([0, 1]),
        torch.tensor([0, 0]),
        torch.tensor([float("nan"), 1.0]),
        torch.tensor([0, 1]),
        torch.tensor([0.5, float("inf")]),
    )
    acc.merge()
    assert acc.rows == EXPECTED_ROWS


def test_score_accumulator_state_round_trip(tmp_path):
    acc = ScoreAccumulator()
    add_batches(acc)
    acc.merge()
    again = ScoreAccumulator()
    again.load_state_dict(acc.state_dict())
    assert again.rows == EXPECTED_ROWS
    path = tmp_path / "scores.pt"
    torch.save(acc.state_dict(), path)
    loaded = ScoreAccumulator()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    assert loaded.rows == EXPECTED_ROWS
    assert list(loaded.rows) == list(acc.rows)  # order kept
    # an empty accumulator round-trips too
    torch.save(ScoreAccumulator().state_dict(), path)
    empty = ScoreAccumulator()
    empty.load_state_dict(torch.load(path, weights_only=True))
    assert empty.rows == {}


# ---------------------------------------------------------------------------------------------
# 3. learning-rate schedule


def test_lr_factor_warmup_then_cosine():
    warmup, total = 2.0, 10.0
    assert lr_factor(0.0, warmup, total) == pytest.approx(0.0, abs=1e-3)
    assert lr_factor(1.0, warmup, total) == pytest.approx(0.5, abs=1e-3)  # mid warm-up
    assert lr_factor(2.0, warmup, total) == 1.0  # end of warm-up
    assert lr_factor(4.0, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6.0, warmup, total) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_factor(10.0, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12.0, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.0, 0.0, total) == 1.0  # no warm-up: full rate at once


def test_lr_factor_never_exceeds_one():
    grid = [i / 10_000 for i in range(0, 30_001)]
    assert max(lr_factor(p, 1.0, 3.0) for p in grid) <= 1.0


# ---------------------------------------------------------------------------------------------
# 4. DeepSpeed config resolution


def ds_file(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(values))
    return path


AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "bf16": {"enabled": "auto"},
}

USUAL = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.01}},
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
}


def test_deepspeed_auto_values_are_filled_from_dtrain(tmp_path):
    config = load_config(
        None, ["data.batch_size=16", "train.grad_accum_steps=3", "optim.grad_clip=2.0"]
    )
    resolved, config = resolve_deepspeed_config(ds_file(tmp_path, AUTO), config, "fp32", 4)
    ds = resolved.config
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["bf16"]["enabled"] is False
    assert resolved.stage == 0
    assert not resolved.builds_optimizer and not resolved.builds_scheduler
    assert (config.data.batch_size, config.train.grad_accum_steps, config.optim.grad_clip) == (
        16,
        3,
        2.0,
    )
    # defaults fill them the same way; bf16 follows the precision
    config = load_config(None, [])
    ds = resolve_deepspeed_config(ds_file(tmp_path, AUTO), config, "bf16", 2)[0].config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 1)
    assert (ds["gradient_clipping"], ds["train_batch_size"]) == (5.0, 128)
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_values_win_over_defaults_the_user_never_set(tmp_path):
    given = load_config(None, [])
    path = ds_file(tmp_path, USUAL)
    resolved, config = resolve_deepspeed_config(path, given, "fp32", 1)
    assert given.optim.lr == load_config(None, []).optim.lr != 0.001  # the given one untouched
    assert config.optim.lr == 0.001
    assert config.optim.grad_clip == 1.0
    assert config.optim.weight_decay == 0.01
    assert config.optim.name == "adamw"
    config.validate()
    assert resolved.builds_optimizer and not resolved.builds_scheduler
    assert resolved.stage == 2
    ds = resolved.config
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"] == {"lr": 0.001, "weight_decay": 0.01}
    assert ds["train_batch_size"] == 64
    notes = "\n".join(resolved.notes)
    assert "optim.lr=0.001" in notes
    assert "optim.grad_clip=1.0" in notes
    assert "optim.weight_decay=0.01" in notes
    assert "DeepSpeed's AdamW" in notes
    assert "warm-up + cosine" in notes  # no scheduler section: dtrain's schedule


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.grad_clip=5.0", "optim.grad_clip"),  # explicit, even though it is the default
        ("optim.lr=0.1", "optim.lr"),
        ("optim.name=sgd", "optim.name"),
    ],
)
def test_deepspeed_values_that_contradict_user_settings_are_refused(tmp_path, override, key):
    config = load_config(None, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_deepspeed_config(ds_file(tmp_path, USUAL), config, "fp32", 1)


def test_deepspeed_train_batch_size_must_match(tmp_path):
    config = load_config(None, ["data.batch_size=16"])
    ok, _ = resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 32}), config, "fp32", 2)
    assert ok.config["train_batch_size"] == 32
    with pytest.raises(ConfigError, match="train_batch_size"):
        resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 100}), config, "fp32", 2)


def test_deepspeed_train_batch_size_error_does_not_call_the_product_the_world_size(tmp_path):
    config = load_config(None, ["data.batch_size=16"])
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(ds_file(tmp_path, {"train_batch_size": 100}), config, "fp32", 2)
    assert "world size = 32" not in str(err.value)


def test_deepspeed_fp16_is_refused_and_scheduler_is_honoured(tmp_path):
    config = load_config(None, [])
    with pytest.raises(ConfigError, match="fp16"):
        resolve_deepspeed_config(ds_file(tmp_path, {"fp16": {"enabled": True}}), config, "fp32", 1)
    scheduler = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    resolved, _ = resolve_deepspeed_config(ds_file(tmp_path, scheduler), config, "fp32", 1)
    assert resolved.builds_scheduler and not resolved.builds_optimizer
    assert any("DeepSpeed's WarmupLR" in note for note in resolved.notes)


def test_deepspeed_bf16_wins_unless_the_user_set_the_precision(tmp_path):
    path = ds_file(tmp_path, {"bf16": {"enabled": True}})
    resolved, config = resolve_deepspeed_config(path, load_config(None, []), "fp32", 1)
    assert config.train.precision == "bf16" and resolved.config["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_deepspeed_config(path, load_config(None, ["train.precision=fp32"]), "fp32", 1)


def test_deepspeed_precision_change_is_reported(tmp_path):
    path = ds_file(tmp_path, {"bf16": {"enabled": True}})
    resolved, _ = resolve_deepspeed_config(path, load_config(None, []), "fp32", 1)
    assert any("train.precision" in note for note in resolved.notes)


# ---------------------------------------------------------------------------------------------
# 5. NT-Xent


def test_nt_xent_by_hand():
    """tau = 1. Views a0 = (1, 0), a1 = (0, 1), b0 = (0.6, 0.8), b1 = (-0.8, 0.6). Each view's
    positive has similarity 0.6; its two negatives have {0, -0.8} (a0, b1) or {0, 0.8} (a1, b0),
    so the mean over the four views is
    -0.6 + (log(e^0.6 + 1 + e^-0.8) + log(e^0.6 + 1 + e^0.8)) / 2."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    expected = -0.6 + 0.5 * (
        math.log(math.exp(0.6) + 1 + math.exp(-0.8)) + math.log(math.exp(0.6) + 1 + math.exp(0.8))
    )
    got = losses.nt_xent(z1, z2, 1.0, gather=False)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # tau = 0.5 doubles every similarity
    expected = -1.2 + 0.5 * (
        math.log(math.exp(1.2) + 1 + math.exp(-1.6)) + math.log(math.exp(1.2) + 1 + math.exp(1.6))
    )
    assert losses.nt_xent(z1, z2, 0.5, gather=False).item() == pytest.approx(expected, rel=1e-6)


def normalised_pair(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z1 = nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1)
    z2 = nn.functional.normalize(z1 + 0.3 * torch.randn(n, d, generator=generator), dim=-1)
    return z1, z2


def test_nt_xent_is_fp32_under_bf16_autocast():
    z1, z2 = normalised_pair(32, 16, 0)
    reference = losses.nt_xent(z1, z2, 0.05, gather=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = losses.nt_xent(z1, z2, 0.05, gather=False)
    assert under.dtype == torch.float32
    assert abs(under.item() - reference.item()) <= 1e-6


def test_nt_xent_padding_changes_nothing_and_all_padding_is_zero_with_a_graph():
    z1, z2 = normalised_pair(6, 4, 1)
    valid = torch.tensor([True, False, True, True, False, True])
    keep = [0, 2, 3, 5]
    masked = losses.nt_xent(z1, z2, 0.5, valid, gather=False)
    only_valid = losses.nt_xent(z1[keep], z2[keep], 0.5, gather=False)
    torch.testing.assert_close(masked, only_valid)
    # the padding rows' contents do not matter at all
    garbage1, garbage2 = z1.clone(), z2.clone()
    garbage1[[1, 4]] = torch.tensor([[5.0, -3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    garbage2[[1, 4]] = torch.tensor([[-7.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(losses.nt_xent(garbage1, garbage2, 0.5, valid, gather=False), masked)
    # an all-padding batch: 0, and backward works with finite gradients
    a = z1.clone().requires_grad_()
    b = z2.clone().requires_grad_()
    loss = losses.nt_xent(a, b, 0.5, torch.zeros(6, dtype=torch.bool), gather=False)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# 6. GroupAttention and padding


def test_group_attention_group_mean_ignores_padding_members():
    torch.manual_seed(0)
    block = GroupAttention(8, 3, 16, "feature+label+confidence")
    h = torch.randn(2, 3, 8)
    labels = torch.randint(0, 3, (2, 3))
    logits = torch.randn(2, 3, 3)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    weights = block(h, labels, logits, valid)
    # the valid members weigh as in a group without the padding member
    alone = block(h[:1, :2], labels[:1, :2], logits[:1, :2])
    torch.testing.assert_close(weights[0, :2], alone[0])
    changed = h.clone()
    changed[0, 2] += 10.0  # the padding member's feature
    after = block(changed, labels, logits, valid)
    torch.testing.assert_close(after[0, :2], weights[0, :2], rtol=0, atol=0)
    torch.testing.assert_close(after[1], weights[1], rtol=0, atol=0)
    # valid=None: the plain mean over all members, so the same change moves the others
    plain = block(h, labels, logits)
    torch.testing.assert_close(block(h, labels, logits, torch.ones(2, 3, dtype=torch.bool)), plain)
    plain_after = block(changed, labels, logits)
    assert not torch.allclose(plain_after[0, :2], plain[0, :2])
    torch.testing.assert_close(plain_after[1], plain[1])


# ---------------------------------------------------------------------------------------------
# 7. Co-teaching


def meta(model: str, nominal: float, realised: float) -> dict:
    return {
        "noise": {"model": model, "rate": nominal},
        "splits": {"train": {"noise_rate": realised}},
    }


def test_forget_rate_explicit_then_nominal_never_realised():
    symmetric = meta("symmetric", 0.4, 0.37)
    explicit = load_config(None, ["method.name=coteaching", "method.coteaching_forget_rate=0.25"])
    assert forget_rate(explicit, symmetric) == 0.25
    assert forget_rate(explicit, meta("none", 0.0, 0.0)) == 0.25
    zero = load_config(None, ["method.name=coteaching", "method.coteaching_forget_rate=0"])
    assert forget_rate(zero, symmetric) == 0.0  # an explicit 0 is a value, not "unset"
    nominal = load_config(None, ["method.name=coteaching"])
    assert forget_rate(nominal, symmetric) == 0.4
    with pytest.raises(ConfigError, match="method.coteaching_forget_rate"):
        forget_rate(nominal, meta("none", 0.0, 0.0))
    reviewed = {**symmetric, "relabel": {"changed": 197}}  # the prepared rate no longer holds
    with pytest.raises(ConfigError, match="relabelled after a review"):
        forget_rate(nominal, reviewed)
    assert forget_rate(explicit, reviewed) == 0.25


def test_coteaching_loss_six_samples_two_padding():
    """Logits [s, 0] with label 0 give CE log(1 + e^-s). The padding samples (1 and 4) have
    the smallest loss of all for both peers, yet are never picked: keep ceil(0.5 * 4) = 2."""
    valid = [True, False, True, True, False, True]
    s1 = [3.0, 9.0, -1.0, 1.0, 8.0, 0.0]
    s2 = [-2.0, 9.0, 2.0, 0.0, 8.0, 1.0]
    l1 = [math.log(1 + math.exp(-s)) for s in s1]
    l2 = [math.log(1 + math.exp(-s)) for s in s2]
    keep = math.ceil(0.5 * sum(valid))
    assert keep == 2
    candidates = [i for i in range(6) if valid[i]]
    pick1 = sorted(candidates, key=lambda i: l1[i])[:keep]  # peer 1's small-loss samples
    pick2 = sorted(candidates, key=lambda i: l2[i])[:keep]
    assert sorted(pick1) == [0, 3] and sorted(pick2) == [2, 5]
    expected = sum(l1[i] for i in pick2) / keep + sum(l2[i] for i in pick1) / keep
    got = losses.coteaching_loss(
        torch.tensor([[s, 0.0] for s in s1]),
        torch.tensor([[s, 0.0] for s in s2]),
        torch.zeros(6, dtype=torch.long),
        0.5,
        torch.tensor(valid),
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 8. method registry, implied values, presets


def test_afm_implies_feature_attention_unless_set():
    assert load_config(None, ["method.name=afm"]).model.attention_inputs == "feature"
    explicit = load_config(None, ["method.name=afm", "model.attention_inputs=feature+label"])
    assert explicit.model.attention_inputs == "feature+label"
    assert load_config(None, []).model.attention_inputs == "feature+label+confidence"
    assert load_config(None, ["method.name=iam"]).model.attention_inputs == (
        "feature+label+confidence"
    )


def test_registry_and_presets_agree():
    presets = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert presets == sorted(METHODS)
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.preset == (CONFIGS / f"{name}.yaml").resolve()
        config = load_config(spec.preset)
        config.validate()
        assert config.method.name == name
    assert typing.get_args(MethodName) == tuple(METHODS)


# ---------------------------------------------------------------------------------------------
# 9. input-mixup baseline


def test_mixup_reports_eval_mode_logits_on_the_unmixed_view():
    config = load_config(None, ["method.name=mixup", "model.backbone=test_resnet"])
    torch.manual_seed(0)
    net = build_model(config.model, "mixup", num_classes=3, in_chans=1)
    net.train()
    batch = {
        "view1": torch.randn(8, 1, 32, 32),
        "view2": torch.randn(8, 1, 32, 32),
        "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
        "valid": torch.ones(8, dtype=torch.bool),
    }
    out = training_step(net, batch, config.method, 1, 3, 0.0)
    assert net.training and all(m.training for m in net.modules())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    net.eval()
    with torch.no_grad():
        expected = net(batch["view1"])
    torch.testing.assert_close(out.logits, expected)
    expected_ce = nn.functional.cross_entropy(expected, batch["label"], reduction="none")
    torch.testing.assert_close(out.sample_loss, expected_ce)


# ---------------------------------------------------------------------------------------------
# 10. config coercion and identity


def test_literal_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"model\.stem='big'.*imagenet.*small"):
        load_config(None, ["model.stem=big"])
    assert load_config(None, ["model.stem=small"]).model.stem == "small"


@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("method.group_sise=4", "method.group_size"),
        ("data.batchsize=8", "data.batch_size"),
        ("optim.warmup_epoch=2", "optim.warmup_epochs"),
    ],
)
def test_unknown_key_suggests_the_nearest(override, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean {suggestion}\?"):
        load_config(None, [override])


def dotted(values: dict) -> set[str]:
    return {f"{section}.{key}" for section, entries in values.items() for key in entries}


def test_identity_drops_exactly_the_operational_keys():
    config = load_config(None, [])
    expected = {
        "optim.lr",
        "optim.warmup_epochs",
        "optim.grad_clip",
        "train.log_every",
        "train.progress",
        "train.max_nonfinite_steps",
        "train.stop_after_steps",
        "train.checkpoint_every_steps",
        "train.checkpoint_every_minutes",
        "train.dist_timeout_s",
        "train.compile",
        "train.channels_last",
        "train.trackers",
    }
    assert set(operational_keys()) == expected
    assert dotted(config.to_dict()) - dotted(config.identity()) == expected
    assert dotted(config.identity()) <= dotted(config.to_dict())
    # an operational change leaves the identity alone, any other change does not
    assert load_config(None, ["optim.lr=0.3"]).identity() == config.identity()
    assert load_config(None, ["method.group_size=4"]).identity() != config.identity()


def test_deepspeed_train_batch_size_alone_sets_the_per_rank_batch(tmp_path):
    path = ds_file(tmp_path, {"train_batch_size": 256})
    config = load_config(None, ["train.grad_accum_steps=2"])
    resolved, config = resolve_deepspeed_config(path, config, "fp32", 4)
    assert config.data.batch_size == 32
    assert resolved.config["train_micro_batch_size_per_gpu"] == 32
    assert any("data.batch_size=32" in note for note in resolved.notes)
    with pytest.raises(ConfigError, match="train_batch_size"):  # the user's own batch stands
        resolve_deepspeed_config(path, load_config(None, ["data.batch_size=16"]), "fp32", 4)
