"""One training step of each method: the loss on a batch, plus per-sample scores for the mislabel
ranking (the attention weight where the method has one, and the per-sample CE everywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dtrain.config import MethodConfig
from dtrain.train import losses
from dtrain.train.model import CoTeachingNet, NoiseRobustNet


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # view-1 logits, detached: train accuracy
    sample_loss: torch.Tensor  # per-sample CE on view 1, detached: the small-loss score
    attention: torch.Tensor | None = None  # per-sample attention weight, detached
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss terms


def _uses_contrastive(cfg: MethodConfig) -> bool:
    return cfg.name in ("iam", "iam_no_mixup") and cfg.lambda_con > 0


def _uses_mixup(cfg: MethodConfig) -> bool:
    return cfg.name in ("iam", "iam_no_con") and cfg.lambda_iam > 0


def attention_method_step(
    model: NoiseRobustNet, batch: dict, cfg: MethodConfig, epoch: int, num_classes: int
) -> StepOutput:
    """L = L_ce + lambda_iam L_iam + lambda_con L_con (method.md), its ablations, and AFM."""
    x1, labels, valid = batch["view1"], batch["label"], batch["valid"]
    contrastive = _uses_contrastive(cfg)
    if contrastive:
        h1, h2 = model.encoder(torch.cat([x1, batch["view2"]])).chunk(2)
    else:
        h1 = model.encoder(x1)
    logits = model.classifier(h1)
    sample_loss = F.cross_entropy(losses.wide(logits), labels, reduction="none")
    terms: dict[str, torch.Tensor] = {}
    attention = None

    if cfg.name == "afm":
        # AFM's fixed pairing, i with i + B/2, as a group of two
        half = len(h1) // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], 1).to(h1.device)
        attention = _attention(model, h1, labels, logits, pairs)
        loss = losses.afm_loss(h1, attention, labels, model.classifier, num_classes, valid)
        terms["afm"] = loss.detach()
    else:
        loss = losses.masked_mean(sample_loss, valid)
        terms["ce"] = loss.detach()
        groups = losses.make_groups(len(h1), cfg.group_size, h1.device)
        # the attention learns only through L_iam: without it its weights are noise, not a score
        if _uses_mixup(cfg) and epoch >= cfg.warmup_epochs:
            attention = _attention(model, h1, labels, logits, groups)
            num_pairs = groups.shape[0] * cfg.group_size * (cfg.group_size - 1) // 2
            lam = losses.sample_lam(num_pairs, cfg.mixup_alpha, h1.device)
            feature_space = cfg.mixup_space == "feature"
            iam = losses.intra_group_mixup(
                h1 if feature_space else logits,
                attention,
                labels,
                groups,
                lam,
                num_classes,
                head=model.classifier if feature_space else None,
                valid=valid,
                backend=cfg.mixup_backend,
            )
            loss = loss + cfg.lambda_iam * iam
            terms["iam"] = iam.detach()
    if contrastive:
        con = losses.nt_xent(model.project(h1), model.project(h2), cfg.temperature, valid)
        loss = loss + cfg.lambda_con * con
        terms["con"] = con.detach()
    return StepOutput(
        loss,
        logits.detach(),
        sample_loss.detach(),
        None if attention is None else attention.detach(),
        terms,
    )


def _attention(
    model: NoiseRobustNet,
    h: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Attention weights [B] in batch order, computed group by group."""
    grouped = model.attention(h[groups], labels[groups], logits.detach()[groups])
    out = torch.empty(len(h), dtype=grouped.dtype, device=h.device)
    out[groups.reshape(-1)] = grouped.reshape(-1)
    return out


def baseline_step(
    model: torch.nn.Module, batch: dict, cfg: MethodConfig, epoch: int, forget_rate: float
) -> StepOutput:
    """CE, input mixup, GCE, SCE and Co-teaching, all on view 1."""
    x, labels, valid = batch["view1"], batch["label"], batch["valid"]
    if cfg.name == "coteaching":
        assert isinstance(model, CoTeachingNet)
        logits, logits2 = model.peers[0](x), model.peers[1](x)
        rate = forget_rate * min(1.0, epoch / max(1, cfg.coteaching_ramp_epochs))
        loss = losses.coteaching_loss(logits, logits2, labels, rate, valid)
    elif cfg.name == "mixup":
        lam = float(losses.sample_lam(1, cfg.mixup_alpha)[0])
        perm = torch.randperm(len(x), device=x.device)
        logits_mixed = model(lam * x + (1 - lam) * x[perm])
        both = valid & valid[perm]
        per = lam * F.cross_entropy(losses.wide(logits_mixed), labels, reduction="none") + (
            1 - lam
        ) * F.cross_entropy(losses.wide(logits_mixed), labels[perm], reduction="none")
        loss = losses.masked_mean(per, both)
        logits = logits_mixed  # monitoring only: a clean forward pass would cost half a step
    else:
        logits = model(x)
        if cfg.name == "gce":
            per = losses.gce_loss(logits, labels, cfg.gce_q)
        elif cfg.name == "sce":
            per = losses.sce_loss(logits, labels, cfg.sce_alpha, cfg.sce_beta)
        else:
            per = F.cross_entropy(losses.wide(logits), labels, reduction="none")
        loss = losses.masked_mean(per, valid)
    sample_loss = F.cross_entropy(losses.wide(logits.detach()), labels, reduction="none")
    return StepOutput(loss, logits.detach(), sample_loss, None, {cfg.name: loss.detach()})


def training_step(
    model: torch.nn.Module,
    batch: dict,
    cfg: MethodConfig,
    epoch: int,
    num_classes: int,
    forget_rate: float,
) -> StepOutput:
    if cfg.name in ("iam", "iam_no_con", "iam_no_mixup", "afm"):
        return attention_method_step(model, batch, cfg, epoch, num_classes)
    return baseline_step(model, batch, cfg, epoch, forget_rate)


class TrainStep(torch.nn.Module):
    """The training loss as one module, so that DDP and DeepSpeed see a single forward pass per
    step (their gradient hooks are armed by it). `net` is the network tested and saved."""

    def __init__(
        self, net: torch.nn.Module, cfg: MethodConfig, num_classes: int, forget_rate: float
    ) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.num_classes = num_classes
        self.forget_rate = forget_rate

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        label: torch.Tensor,
        valid: torch.Tensor,
        epoch: int,
    ) -> dict:
        """StepOutput's fields as a plain dict: DDP looks for tensors in dicts."""
        batch = {"view1": view1, "view2": view2, "label": label, "valid": valid}
        out = training_step(self.net, batch, self.cfg, epoch, self.num_classes, self.forget_rate)
        return dict(vars(out))
