"""Every training method in one table. Config validation, the model builder, the trainer, the CLI
help and the tests all read it; adding a method is one entry here (plus its step function).

A leaf module on purpose: it imports nothing from dtrain, so config and model can both read it.
The step function is named by its dotted path and bound where the trainer builds its step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PRESETS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    step: str  # "module:function" of its training step, bound by the trainer
    model: Literal["single", "peers"] = "single"  # peers: Co-teaching's two networks
    groups: bool = False  # draws intra-group mixup groups: method.group_size must divide the batch
    pairs_halves: bool = False  # AFM's fixed pairing of i with i + B/2: the batch must be even
    mixup: bool = False  # has the L_iam term (trains the attention block)
    contrastive: bool = False  # has the NT-Xent term (second view, projection head)
    elr: bool = False  # adds ELR's regulariser (dtrain.methods.losses.elr_term)
    # trains on samples whose label is hidden (label -1: the CE skips them, the label-free terms
    # keep them), as the folds of a cross-fitted clean-up round do (train.refine_folds)
    unlabelled: bool = False
    # "module:function" building its per-sample memory (dtrain.methods.memory.MemoryRule)
    memory: str = ""
    # config values the method implies unless the user sets them (`method.name=afm` alone gives
    # AFM's feature-only attention, as configs/afm.yaml does)
    implies: dict[str, Any] = field(default_factory=dict)

    @property
    def attention(self) -> bool:
        """Whether it trains the attention block, whose weight is a mislabel score."""
        return self.mixup or self.pairs_halves

    @property
    def preset(self) -> Path:
        return PRESETS / f"{self.name}.yaml"


def _steps(name: str) -> str:
    return f"dtrain.methods.steps:{name}"


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "iam",
            "the method: CE + intra-group attention mixup + NT-Xent (method.md)",
            _steps("attention_method_step"),
            groups=True,
            mixup=True,
            contrastive=True,
        ),
        MethodSpec(
            "iam_no_con",
            "ablation: the method without the contrastive term",
            _steps("attention_method_step"),
            groups=True,
            mixup=True,
        ),
        MethodSpec(
            "iam_no_mixup",
            "ablation: the method without the attention mixup (CE + NT-Xent)",
            _steps("attention_method_step"),
            contrastive=True,
            unlabelled=True,
        ),
        MethodSpec(
            "afm",
            "AFM as published: K = 2 halves, feature-only attention, 0.5/0.5 labels",
            _steps("attention_method_step"),
            pairs_halves=True,
            implies={"model.attention_inputs": "feature"},
        ),
        MethodSpec(
            "iam_elr",
            "the method + ELR's regulariser towards each sample's running-average prediction",
            _steps("attention_method_step"),
            groups=True,
            mixup=True,
            contrastive=True,
            elr=True,
            memory="dtrain.methods.elr:elr_targets_rule",
            # chosen on the main job's tuning seeds (docs/results.md): without a ramp one seed
            # of two collapsed to one class
            implies={"method.elr_rampup_epochs": 30},
        ),
        MethodSpec(
            "con_elr",
            "the default: CE + NT-Xent + ELR's term, ramped in (iam_elr without the mixup)",
            _steps("attention_method_step"),
            contrastive=True,
            elr=True,
            unlabelled=True,
            memory="dtrain.methods.elr:elr_targets_rule",
            implies={"method.elr_rampup_epochs": 30},
        ),
        MethodSpec("ce", "baseline: plain cross-entropy", _steps("ce_step")),
        MethodSpec("mixup", "baseline: input mixup, Beta(alpha, alpha)", _steps("mixup_step")),
        MethodSpec(
            "gce", "baseline: generalised cross-entropy (q = method.gce_q)", _steps("gce_step")
        ),
        MethodSpec("sce", "baseline: symmetric cross-entropy", _steps("sce_step")),
        MethodSpec(
            "elr",
            "baseline: ELR, CE + early-learning regularisation (Liu et al. 2020)",
            _steps("elr_step"),
            memory="dtrain.methods.elr:elr_targets_rule",
        ),
        MethodSpec(
            "dividemix",
            "baseline: DivideMix, GMM-divided peers + MixMatch (Li et al. 2020)",
            "dtrain.methods.dividemix:dividemix_step",
            model="peers",
            memory="dtrain.methods.dividemix:division_rule",
            implies={"method.warmup_epochs": 5},
        ),
        MethodSpec(
            "coteaching",
            "baseline: Co-teaching, two peers teach each other their small-loss samples",
            _steps("coteaching_step"),
            model="peers",
        ),
    )
}

# the names as a type, for the config field (a Literal built from the table, not a second list)
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


def methods_help() -> str:
    """One line per method, for `dtrain train --help`."""
    return "\n".join(f"  {s.name:13s} {s.summary}" for s in METHODS.values())
