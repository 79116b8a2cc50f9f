"""One training step of each method: the loss on a batch, plus per-sample scores for the mislabel
ranking (the attention weight where the method has one, and the per-sample CE everywhere).

Every loss here is a mean over this rank's valid samples; the trainer weighs it by this rank's
share of the global valid count, so that several ranks compute the one-process mean. Nothing in
a step reads a value back to the host. The contrastive loss and the mixup run inside profiler
ranges (CONTRASTIVE, MIXUP), so that a profile, and benchmarks/step_breakdown.py, can tell their
cost apart from the network's."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from dtrain.config import Config, MethodConfig
from dtrain.errors import ConfigError
from dtrain.methods import losses
from dtrain.methods.division import divide
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
class MemoryRule:
    """A method's per-sample memory (ELR's targets, DivideMix's division), kept by the trainer:
    a row per sample, `initial` before its first epoch. A step reads the sample's row as
    batch["memory"] and hands back StepOutput.memory; at each epoch's end the rows of the
    samples seen become end_epoch(row, what the steps handed back)."""

    initial: tuple[float, ...]
    end_epoch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def width(self) -> int:
        return len(self.initial)


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
            ce = _label_ce(logits, sample_loss, labels, batch["memory"], ctx)
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
            weight = ramp(cfg.consistency_lambda, cfg.consistency_rampup_epochs, ctx.epoch)
            loss = loss + weight * cons
            terms["cons"] = cons.detach()
    observed = None
    if spec.elr:
        elr, observed = _elr(logits, labels, sample_loss, batch["memory"], ctx, valid)
        loss = loss + elr_weight(cfg, ctx.epoch) * elr
        terms["elr"] = elr.detach()
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
    ce = _label_ce(logits, sample_loss, labels, batch["memory"], ctx)
    elr, observed = _elr(logits, labels, sample_loss, batch["memory"], ctx, valid)
    loss = losses.masked_mean(ce, valid)
    out = _baseline_output(loss + elr_weight(ctx.cfg, ctx.epoch) * elr, logits, labels, "ce")
    out.terms["ce"], out.terms["elr"], out.memory = loss.detach(), elr.detach(), observed
    return out


def elr_weight(cfg: MethodConfig, epoch: int) -> float:
    """ELR's weight in epoch `epoch` (from 0): elr_lambda ramped over method.elr_rampup_epochs,
    near zero while the model is still at chance, whose confident guesses the term would lock
    in."""
    return ramp(cfg.elr_lambda, cfg.elr_rampup_epochs, epoch)


def ramp(weight: float, rampup_epochs: int, epoch: int) -> float:
    """weight exp(-5 (1 - t)^2), t the share of `rampup_epochs` done at `epoch` (from 0), then
    `weight` (the ramp of Laine and Aila's temporal ensembling, ICLR 2017; 0 epochs: constant)."""
    if epoch >= rampup_epochs:
        return weight
    return weight * math.exp(-5 * (1 - epoch / rampup_epochs) ** 2)


def _elr(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sample_loss: torch.Tensor,
    memory: torch.Tensor,
    ctx: StepContext,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELR's regulariser, and the row the step hands back: p, the CE against the given label
    (for the division) and the label."""
    elr, p = losses.elr_term(logits, memory[:, : ctx.num_classes], ctx.cfg.elr_beta, valid)
    return elr, torch.cat([p, sample_loss.detach()[:, None], labels.float()[:, None]], 1)


def _label_ce(
    logits: torch.Tensor,
    sample_loss: torch.Tensor,
    labels: torch.Tensor,
    memory: torch.Tensor,
    ctx: StepContext,
) -> torch.Tensor:
    """The per-sample CE term of an ELR method: against the given label, or against the refined
    target once refining (method.elr_refine_from)."""
    if not refining(ctx.cfg, ctx.epoch):
        return sample_loss
    target = refined_targets(memory, labels, ctx.num_classes)
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
