"""ELR's pieces (Liu et al., NeurIPS 2020) that its steps share (`elr`, `iam_elr`, `con_elr`):
the regulariser's weight over the epochs, the row a step hands to the per-sample memory, the
refined CE target (method.elr_refine_from), and the memory's rule. The regulariser itself is
`losses.elr_term`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtrain.config import MethodConfig
from dtrain.methods import losses
from dtrain.methods.division import divide
from dtrain.methods.memory import MemoryRule


def elr_weight(cfg: MethodConfig, epoch: int) -> float:
    """ELR's weight in epoch `epoch` (from 0): elr_lambda ramped over method.elr_rampup_epochs,
    near zero while the model is still at chance, whose confident guesses the term would lock
    in."""
    return losses.ramp(cfg.elr_lambda, cfg.elr_rampup_epochs, epoch)


def elr_and_row(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sample_loss: torch.Tensor,
    memory: torch.Tensor,
    cfg: MethodConfig,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELR's regulariser, and the row the step hands back: p, the CE against the given label
    (for the division) and the label."""
    num_classes = logits.shape[1]
    elr, p = losses.elr_term(logits, memory[:, :num_classes], cfg.elr_beta, valid)
    return elr, torch.cat([p, sample_loss.detach()[:, None], labels.float()[:, None]], 1)


def label_ce(
    logits: torch.Tensor,
    sample_loss: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    cfg: MethodConfig,
    epoch: int,
) -> torch.Tensor:
    """The per-sample CE term of an ELR method: against the given label, or against the refined
    target once refining (method.elr_refine_from)."""
    if not refining(cfg, epoch):
        return sample_loss
    target = refined_targets(memory, labels, logits.shape[1])
    return losses.soft_cross_entropy(logits, target)


def refining(cfg: MethodConfig, epoch: int) -> bool:
    """Whether the CE term trains towards the refined targets (method.elr_refine_from)."""
    return 0 < cfg.elr_refine_from <= epoch


def refined_targets(memory: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """w y + (1 - w) t / sum(t): the given label where the division trusts it, the sample's
    running-average prediction where it does not (DivideMix's label co-refinement, with ELR's
    targets in place of the current prediction)."""
    t = memory[:, :num_classes].float()
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-12)
    w = memory[:, num_classes : num_classes + 1].float()
    return w * F.one_hot(labels, num_classes).float() + (1 - w) * t


def elr_targets_rule(cfg: MethodConfig, num_classes: int) -> MemoryRule:
    """Per sample: ELR's target t(k) = beta t(k-1) + (1 - beta) p (t(0) = 0), the probability
    that its label is clean (a per-class GMM on the epoch's CE losses, while refining; 1
    otherwise) and its label."""

    def end_epoch(previous: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        c = num_classes
        targets = cfg.elr_beta * previous[:, :c] + (1 - cfg.elr_beta) * observed[:, :c]
        clean = torch.ones(len(observed), 1, dtype=previous.dtype)
        if cfg.elr_refine_from > 0:
            loss, labels = observed[:, c].double().numpy(), observed[:, c + 1].numpy()
            clean[:, 0] = torch.from_numpy(divide(loss, labels, per_class=True))
        return torch.cat([targets, clean, observed[:, c + 1 :].to(previous.dtype)], 1)

    return MemoryRule(initial=(0.0,) * num_classes + (1.0, -1.0), end_epoch=end_epoch)
