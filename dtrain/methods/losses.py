"""The losses of method.md and of the baselines. Every function takes a `valid` mask: the loader's
padding samples (valid=False) never count."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dtrain.distributed import all_gather_with_grad, world
from dtrain.methods.mixup_kernels import pair_mix, pair_mix_loss


def wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for a loss (bf16/fp16 logits are widened; fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def ramp(weight: float, rampup_epochs: int, epoch: int) -> float:
    """weight exp(-5 (1 - t)^2), t the share of `rampup_epochs` done at `epoch` (from 0), then
    `weight` (the ramp of Laine and Aila's temporal ensembling, ICLR 2017; 0 epochs: constant)."""
    if epoch >= rampup_epochs:
        return weight
    return weight * math.exp(-5 * (1 - epoch / rampup_epochs) ** 2)


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.mean()
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def rank_weight(valid: torch.Tensor, global_valid: torch.Tensor, world: int) -> torch.Tensor:
    """The factor that turns this rank's mean loss into its share of the global mean: its valid
    count over the global valid count / world. After DDP averages the gradients over ranks, the
    result is the one-process mean over every valid sample, whatever the padding on each rank."""
    return valid.sum() * world / global_valid.clamp_min(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a probability vector."""
    return -(targets * F.log_softmax(wide(logits), dim=-1)).sum(dim=-1)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """SimCLR's NT-Xent on normalised projections [B, d]: the positive of each view is the other
    view of the same image, every other view of the batch is a negative. Padding samples
    (valid=False) take no part.

    With several processes and `gather`, the negatives are the views of the *global* batch (one
    all-gather that keeps gradients, the valid mask riding along) while each rank averages over
    its own anchors (the local-loss form). Similarities are fp32 even under autocast: bf16 costs
    ~1e-2 at tau = 0.5, and more at the small tau a search tries. No value is read back."""
    n, dim = z1.shape
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=z1.device)
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2 = wide(z1), wide(z2)
        local = torch.cat([z1, z2, valid.to(z1.dtype).unsqueeze(1)], dim=1)
        rank, offset, everything = 0, 0, local
        if gather:
            rank, _ = world()
            everything = all_gather_with_grad(local)
            offset = rank * n
        keys_valid = everything[:, 2 * dim] > 0.5
        total = len(everything)
        anchors = torch.cat([z1, z2])
        keys = torch.cat([everything[:, :dim], everything[:, dim : 2 * dim]])
        sim = anchors @ keys.T / temperature
        own = torch.arange(n, device=z1.device) + offset
        blocked = torch.zeros_like(sim, dtype=torch.bool)
        blocked[torch.arange(2 * n, device=z1.device), torch.cat([own, own + total])] = True
        blocked |= ~torch.cat([keys_valid, keys_valid]).unsqueeze(0)
        rows = torch.cat([valid, valid])
        # a padding anchor gets a finite dummy row (weight 0): no -inf row, no NaN in backward
        logits = torch.where(rows.unsqueeze(1), sim.masked_fill(blocked, float("-inf")), 0.0)
        per_anchor = F.cross_entropy(logits, torch.cat([own + total, own]), reduction="none")
        return masked_mean(per_anchor, rows)


def make_groups(
    batch_size: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """A random partition of the batch into [G, K] index groups."""
    return torch.randperm(batch_size, device=device).view(-1, group_size)


def group_pairs(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch indices (i, j) of every unordered pair inside every group: G * K(K-1)/2 pairs."""
    k = groups.shape[1]
    first, second = torch.triu_indices(k, k, offset=1, device=groups.device)
    return groups[:, first].reshape(-1), groups[:, second].reshape(-1)


def sample_lam(n: int, alpha: float, device: torch.device | None = None) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha) per pair; alpha <= 0 gives lam = 0.5."""
    if alpha <= 0:
        return torch.full((n,), 0.5, device=device)
    concentration = torch.full((n,), float(alpha), device=device)
    # validate_args=False: the argument check would read the values back to the host
    return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()


def pair_weight(a_i: torch.Tensor, a_j: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """w_i = lam a_i / (lam a_i + (1 - lam) a_j); w_j = 1 - w_i."""
    num = lam * a_i
    return num / (num + (1 - lam) * a_j).clamp_min(1e-12)


def intra_group_mixup(
    values: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor,
    lam: torch.Tensor,
    num_classes: int,
    head: torch.nn.Module | None = None,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """L_iam: mean soft-target CE over every pair (i, j) of every group [G, K].

    `values` are pooled features h [B, D] with `head` the linear classifier (feature-space path),
    or logits g(h) [B, C] with `head=None` (the exact logit-space shortcut: g is linear and
    w_i + w_j = 1, so g(w_i h_i + w_j h_j) = w_i g(h_i) + w_j g(h_j)). `lam` holds one prior per
    pair in group_pairs order. `backend` picks the fused Triton op or the torch reference
    (dtrain.mixup_kernels; auto = Triton on CUDA).
    """
    i, j = group_pairs(groups)
    w = pair_weight(attention[i], attention[j], lam).view(groups.shape[0], -1)
    pair_valid = (valid[i] & valid[j]) if valid is not None else torch.ones_like(i, dtype=bool)
    pair_valid = pair_valid.view_as(w)
    if head is None:
        return pair_mix_loss(values, groups, w, labels, pair_valid, backend)
    logits = head(pair_mix(values, groups, w, backend))
    onehot = F.one_hot(labels, num_classes).to(w.dtype)
    weight = w.reshape(-1, 1)
    targets = weight * onehot[i] + (1 - weight) * onehot[j]
    return masked_mean(soft_cross_entropy(logits, targets), pair_valid.reshape(-1))


def afm_loss(
    features: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    num_classes: int,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """AFM as published (Peng et al. 2020): sample i paired with i + B/2, mixed feature
    w h_i + (1 - w) h_j with w = a_i / (a_i + a_j), fixed 0.5/0.5 label mix, and
    1.5 * mixed loss + 0.5 * plain CE."""
    half = len(features) // 2
    i = torch.arange(half, device=features.device)
    j = i + half
    w = pair_weight(attention[i], attention[j], torch.full_like(attention[i], 0.5)).unsqueeze(-1)
    mixed_logits = head(w * features[i] + (1 - w) * features[j])
    onehot = F.one_hot(labels, num_classes).float()
    targets = 0.5 * onehot[i] + 0.5 * onehot[j]
    pair_valid = None if valid is None else valid[i] & valid[j]
    mixed = masked_mean(soft_cross_entropy(mixed_logits, targets), pair_valid)
    plain = masked_mean(F.cross_entropy(wide(head(features)), labels, reduction="none"), valid)
    return 1.5 * mixed + 0.5 * plain


def gce_loss(logits: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """Generalised CE (Zhang & Sabuncu 2018), per sample: (1 - p_y^q) / q; q -> 0 is CE."""
    p_y = wide(logits).softmax(-1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
    if q == 0:
        return -p_y.log()
    return (1 - p_y**q) / q


def sce_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Symmetric CE (Wang et al. 2019), alpha CE + beta reverse CE (log 0 := log 1e-4)."""
    ce = F.cross_entropy(wide(logits), labels, reduction="none")
    p_y = wide(logits).softmax(-1).gather(1, labels[:, None]).squeeze(1)
    reverse = -math.log(1e-4) * (1 - p_y)
    return alpha * ce + beta * reverse


def confident_consistency(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    threshold: float,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """FixMatch's unlabelled loss (Sohn et al., NeurIPS 2020, Eq. 4) between two views of each
    image: (1 / B) sum_i 1[max q_i >= threshold] CE(argmax q_i, z'_i), q_i = softmax(z_i) of the
    first view, detached. It needs no label, so it teaches the images a noisy label gets wrong
    what the model is already sure of on another view."""
    q = wide(teacher_logits.detach()).softmax(-1)
    confidence, pseudo = q.max(-1)
    per_sample = F.cross_entropy(wide(student_logits), pseudo, reduction="none")
    return masked_mean(per_sample * (confidence >= threshold), valid)


def elr_term(
    logits: torch.Tensor, previous: torch.Tensor, beta: float, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ELR's regulariser (Liu et al., "Early-Learning Regularization Prevents Memorization of
    Noisy Labels", NeurIPS 2020, Sec. 4 and its official code), with p_i = clamp(softmax(z_i),
    1e-4, 1 - 1e-4):

        t_i(k) = beta t_i(k-1) + (1 - beta) p_i / sum_c p_ic     (detached; t_i(0) = 0)
        R = mean_i log(1 - <p_i, t_i(k)>)

    `previous` is t(k-1) from the trainer's per-sample memory; returns R and the detached
    normalised p_i, which the memory folds into t at the epoch's end (`elr_targets_rule`)."""
    p = wide(logits).softmax(-1).clamp(1e-4, 1 - 1e-4)
    observed = (p / p.sum(-1, keepdim=True)).detach()
    target = beta * previous.to(p.dtype) + (1 - beta) * observed
    return masked_mean((1 - (target * p).sum(-1)).log(), valid), observed


def coteaching_loss(
    logits1: torch.Tensor,
    logits2: torch.Tensor,
    labels: torch.Tensor,
    forget_rate: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Co-teaching (Han et al. 2018): each peer picks its ceil((1 - forget_rate) * valid)
    smallest-loss valid samples and the other peer learns from them. Chosen on the device: a
    rank mask instead of a slice, so nothing is read back."""
    loss1 = F.cross_entropy(wide(logits1), labels, reduction="none")
    loss2 = F.cross_entropy(wide(logits2), labels, reduction="none")
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    keep = torch.ceil((1 - forget_rate) * valid.sum()).clamp_min(1)
    big = torch.finfo(loss1.dtype).max

    def smallest(loss: torch.Tensor) -> torch.Tensor:
        order = loss.detach().masked_fill(~valid, big).argsort()
        position = torch.empty_like(order).scatter_(
            0, order, torch.arange(len(order), device=order.device)
        )
        return (position < keep) & valid

    pick1, pick2 = smallest(loss1), smallest(loss2)
    return masked_mean(loss1, pick2) + masked_mean(loss2, pick1)
