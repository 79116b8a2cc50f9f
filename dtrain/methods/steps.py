"""One training step of each method: the loss on a batch, plus per-sample scores for the mislabel
ranking (the attention weight where the method has one, and the per-sample CE everywhere).

Every loss here is a mean over this rank's valid samples; the trainer weighs it by this rank's
share of the global valid count, so that several ranks compute the one-process mean. Nothing in
a step reads a value back to the host. The contrastive loss and the mixup run inside profiler
ranges (CONTRASTIVE, MIXUP), so that a profile, and benchmarks/step_breakdown.py, can tell their
cost apart from the network's."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from dtrain.config import Config, MethodConfig
from dtrain.errors import ConfigError
from dtrain.methods import elr, losses
from dtrain.methods.memory import MemoryRule
from dtrain.methods.model import CoTeachingNet, NoiseRobustNet
from dtrain.methods.registry import METHODS

CONTRASTIVE, MIXUP = "dtrain.contrastive", "dtrain.mixup"  # profiler range names


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # view-1 logits on the unmixed image, detached: train accuracy
    sample_loss: torch.Tensor  # per-sample CE on view 1, detached: the small-loss score
    attention: torch.Tensor | None = None  # per-sample attention weight, detached
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss terms
    # per sample, detached: what the method keeps between epochs (MemoryRule)
    memory: torch.Tensor | None = None


@dataclass(frozen=True)
class StepContext:
    """What a step needs besides the network and the batch."""

    cfg: MethodConfig
    epoch: int
    num_classes: int
    forget_rate: float  # Co-teaching's, see forget_rate()


StepFunction = Callable[[torch.nn.Module, dict, StepContext], StepOutput]


def attention_method_step(model: NoiseRobustNet, batch: dict, ctx: StepContext) -> StepOutput:
    """L = L_ce + lambda_iam L_iam + lambda_con L_con (method.md), its ablations, and AFM."""
    cfg = ctx.cfg
    spec = METHODS[cfg.name]
    x1, valid = batch["view1"], batch["valid"]
    # a hidden label (-1, spec.unlabelled) leaves the CE; the contrastive and ELR terms need none
    labelled = valid & (batch["label"] >= 0)
    labels = batch["label"].clamp_min(0)
    contrastive = spec.contrastive and cfg.lambda_con > 0
    if contrastive:
        h1, h2 = model.encoder(torch.cat([x1, batch["view2"]])).chunk(2)
    else:
        h1 = model.encoder(x1)
    logits = model.classifier(h1)
    sample_loss = F.cross_entropy(losses.wide(logits), labels, reduction="none")
    terms: dict[str, torch.Tensor] = {}
    attention = None

    if spec.pairs_halves:
        # AFM's fixed pairing, i with i + B/2, as groups of two
        half = len(h1) // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], 1).to(h1.device)
        with record_function(MIXUP):
            attention = _attention(model, h1, labels, logits, valid, pairs)
            loss = losses.afm_loss(h1, attention, labels, model.classifier, ctx.num_classes, valid)
        terms["afm"] = loss.detach()
    else:
        ce = sample_loss
        if spec.elr:
            ce = elr.label_ce(logits, sample_loss, labels, batch["memory"], cfg, ctx.epoch)
        loss = losses.masked_mean(ce, labelled)
        terms["ce"] = loss.detach()
        # the attention learns only through L_iam: without it its weights are noise, not a score
        if spec.mixup and cfg.lambda_iam > 0 and ctx.epoch >= cfg.warmup_epochs:
            with record_function(MIXUP):
                groups = losses.make_groups(len(h1), cfg.group_size, h1.device)
                attention = _attention(model, h1, labels, logits, valid, groups)
                num_pairs = groups.shape[0] * cfg.group_size * (cfg.group_size - 1) // 2
                lam = losses.sample_lam(num_pairs, cfg.mixup_alpha, h1.device)
                feature_space = cfg.mixup_space == "feature"
                iam = losses.intra_group_mixup(
                    h1 if feature_space else logits,
                    attention,
                    labels,
                    groups,
                    lam,
                    ctx.num_classes,
                    head=model.classifier if feature_space else None,
                    valid=valid,
                    backend=cfg.mixup_backend,
                )
            loss = loss + cfg.lambda_iam * iam
            terms["iam"] = iam.detach()
    if contrastive:
        with record_function(CONTRASTIVE):
            con = losses.nt_xent(model.project(h1), model.project(h2), cfg.temperature, valid)
        loss = loss + cfg.lambda_con * con
        terms["con"] = con.detach()
        if cfg.consistency_lambda > 0:
            logits2 = model.classifier(h2)
            cons = losses.confident_consistency(logits, logits2, cfg.consistency_threshold, valid)
            weight = losses.ramp(cfg.consistency_lambda, cfg.consistency_rampup_epochs, ctx.epoch)
            loss = loss + weight * cons
            terms["cons"] = cons.detach()
    observed = None
    if spec.elr:
        regulariser, observed = elr.elr_and_row(
            logits, labels, sample_loss, batch["memory"], cfg, valid
        )
        loss = loss + elr.elr_weight(cfg, ctx.epoch) * regulariser
        terms["elr"] = regulariser.detach()
    return StepOutput(
        loss,
        logits.detach(),
        sample_loss.detach(),
        None if attention is None else attention.detach(),
        terms,
        observed,
    )


def _attention(
    model: NoiseRobustNet,
    h: torch.Tensor,
    labels: torch.Tensor,
    logits: torch.Tensor,
    valid: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """Attention weights [B] in batch order, computed group by group."""
    grouped = model.attention(h[groups], labels[groups], logits.detach()[groups], valid[groups])
    out = torch.empty(len(h), dtype=grouped.dtype, device=h.device)
    out[groups.reshape(-1)] = grouped.reshape(-1)
    return out


def _view1_step(
    model: torch.nn.Module, batch: dict, per_sample: Callable[..., torch.Tensor], name: str
) -> StepOutput:
    """A baseline whose loss is a per-sample function of the view-1 logits."""
    logits = model(batch["view1"])
    loss = losses.masked_mean(per_sample(logits, batch["label"]), batch["valid"])
    return _baseline_output(loss, logits, batch["label"], name)


def _baseline_output(
    loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, name: str
) -> StepOutput:
    sample_loss = F.cross_entropy(losses.wide(logits.detach()), labels, reduction="none")
    return StepOutput(loss, logits.detach(), sample_loss, None, {name: loss.detach()})


def ce_step(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
    """Plain cross-entropy on view 1."""

    def per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(losses.wide(logits), labels, reduction="none")

    return _view1_step(model, batch, per_sample, ctx.cfg.name)


def gce_step(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
    """Generalised cross-entropy, q = method.gce_q."""
    return _view1_step(
        model, batch, lambda z, y: losses.gce_loss(z, y, ctx.cfg.gce_q), ctx.cfg.name
    )


def sce_step(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
    """Symmetric cross-entropy, method.sce_alpha CE + method.sce_beta reverse CE."""
    return _view1_step(
        model,
        batch,
        lambda z, y: losses.sce_loss(z, y, ctx.cfg.sce_alpha, ctx.cfg.sce_beta),
        ctx.cfg.name,
    )


def elr_step(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
    """ELR: CE + elr_lambda * ELR's regulariser on view 1 (losses.elr_term)."""
    logits, labels, valid = model(batch["view1"]), batch["label"], batch["valid"]
    sample_loss = F.cross_entropy(losses.wide(logits), labels, reduction="none")
    cfg, memory = ctx.cfg, batch["memory"]
    ce = elr.label_ce(logits, sample_loss, labels, memory, cfg, ctx.epoch)
    regulariser, observed = elr.elr_and_row(logits, labels, sample_loss, memory, cfg, valid)
    loss = losses.masked_mean(ce, valid)
    total = loss + elr.elr_weight(cfg, ctx.epoch) * regulariser
    out = _baseline_output(total, logits, labels, "ce")
    out.terms["ce"], out.terms["elr"], out.memory = loss.detach(), regulariser.detach(), observed
    return out


def mixup_step(model: torch.nn.Module, batch: dict, ctx: StepContext) -> StepOutput:
    """Input mixup, lam ~ Beta(alpha, alpha) drawn on the device; the scores and the train
    accuracy come from an unmixed forward pass."""
    x, labels, valid = batch["view1"], batch["label"], batch["valid"]
    lam = losses.sample_lam(1, ctx.cfg.mixup_alpha, x.device)[0]
    perm = torch.randperm(len(x), device=x.device)
    with record_function(MIXUP):
        mixed_x = lam * x + (1 - lam) * x[perm]
    mixed = losses.wide(model(mixed_x))
    per = lam * F.cross_entropy(mixed, labels, reduction="none")
    per = per + (1 - lam) * F.cross_entropy(mixed, labels[perm], reduction="none")
    loss = losses.masked_mean(per, valid & valid[perm])
    return _baseline_output(loss, _unmixed_logits(model, x), labels, ctx.cfg.name)


def coteaching_step(model: CoTeachingNet, batch: dict, ctx: StepContext) -> StepOutput:
    """Co-teaching: two peers, each learning from the other's small-loss samples; the forget
    rate ramps up over method.coteaching_ramp_epochs."""
    x, labels = batch["view1"], batch["label"]
    logits, logits2 = model.peers[0](x), model.peers[1](x)
    rate = ctx.forget_rate * min(1.0, ctx.epoch / max(1, ctx.cfg.coteaching_ramp_epochs))
    loss = losses.coteaching_loss(logits, logits2, labels, rate, batch["valid"])
    return _baseline_output(loss, logits, labels, ctx.cfg.name)


@torch.no_grad()
def _unmixed_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The prediction on the plain images, as at test time (eval mode: the batch-norm running
    statistics stay those of the training forward pass)."""
    model.eval()
    try:
        return model(x)
    finally:
        model.train()


def bind_step(method: str) -> StepFunction:
    """The registry names each method's step function by its dotted path; bound here."""
    return _bind(METHODS[method].step)


def memory_rule(cfg: MethodConfig, num_classes: int) -> MemoryRule | None:
    """The method's per-sample memory, if it keeps one (the registry names its builder)."""
    builder = METHODS[cfg.name].memory
    return _bind(builder)(cfg, num_classes) if builder else None


def _bind(dotted: str) -> Callable:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def forget_rate(config: Config, meta: dict) -> float:
    """Co-teaching's forget rate: explicit, or the noise rate the dataset was prepared with
    (never one measured from its clean labels, which a real user does not have)."""
    if config.method.coteaching_forget_rate is not None:
        return config.method.coteaching_forget_rate
    noise = meta.get("noise", {})
    if config.method.name == "coteaching" and noise.get("model", "none") in ("none", "manifest"):
        raise ConfigError(
            "method.coteaching_forget_rate is required: this dataset has no injected noise, so "
            "give your estimate of its label error rate, e.g. method.coteaching_forget_rate=0.2"
        )
    if config.method.name == "coteaching" and "relabel" in meta:
        raise ConfigError(
            "method.coteaching_forget_rate is required: this dataset was relabelled after a "
            f"review, so its prepared noise rate ({noise.get('rate')}) no longer holds; give "
            "your estimate of its remaining label error rate"
        )
    return float(noise.get("rate", 0.0))


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
        self.step_function = bind_step(cfg.name)

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor,
        label: torch.Tensor,
        valid: torch.Tensor,
        epoch: int,
        memory: torch.Tensor | None = None,
    ) -> dict:
        """StepOutput's fields as a plain dict: DDP looks for tensors in dicts."""
        batch = {"view1": view1, "view2": view2, "label": label, "valid": valid, "memory": memory}
        context = StepContext(self.cfg, epoch, self.num_classes, self.forget_rate)
        out = self.step_function(self.net, batch, context)
        return dict(vars(out))


def training_step(
    model: torch.nn.Module,
    batch: dict,
    cfg: MethodConfig,
    epoch: int,
    num_classes: int,
    forget_rate: float,
) -> StepOutput:
    """One step of `cfg.name` on an unwrapped network (tests, benchmarks)."""
    return bind_step(cfg.name)(model, batch, StepContext(cfg, epoch, num_classes, forget_rate))
