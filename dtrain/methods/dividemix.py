"""DivideMix (Li, Socher, Hoi, "DivideMix: Learning with Noisy Labels as Semi-supervised
Learning", ICLR 2020): two peer networks; each epoch a two-component GMM fitted to each peer's
per-sample loss divides the training set into a labelled (probably clean) and an unlabelled
part, and each peer trains with MixMatch on the division its peer made.

The equations implemented (the paper's Sec. 3 and Algorithm 1, with its CIFAR-10 defaults):

- co-divide: w_i = p(g | l_i), the posterior of the low-mean component g of a 2-component GMM
  fitted to the min-max normalised losses l_i (`clean_probability`); labelled if w_i > tau.
- label co-refinement: ybar_i = w_i y_i + (1 - w_i) p_i (p averaged over the two views, this
  peer's), then sharpened: Sharpen(p, T)_c = p_c^(1/T) / sum_c' p_c'^(1/T).
- label co-guessing: q_u = Sharpen(mean of both peers' p over both views, T).
- MixMatch: lam ~ Beta(alpha, alpha), lam' = max(lam, 1 - lam); x' = lam' x_1 + (1 - lam') x_2,
  p' = lam' p_1 + (1 - lam') p_2 over the shuffled labelled + unlabelled batch (both views).
- L = L_X + lambda_u L_U + lambda_r L_reg: L_X the soft CE on the mixed labelled rows, L_U the
  mean squared error on the mixed unlabelled rows, L_reg = sum_c pi_c log(pi_c / mean_x p_c(x))
  with uniform pi (lambda_r = 1); lambda_u ramps up linearly after the warm-up.
- warm-up: plain CE for method.warmup_epochs epochs (both peers).

`method.dividemix_divide=per_class` fits one GMM per given class instead of one over all
samples (not in the paper): with a weak warm-up model the global GMM can divide by class (the
class the model predicts has the low losses), and the labelled part then holds one class only.

Where this differs from the paper, to fit one streaming loader and one step per batch:
- the division is made on the training pass's losses (the view-1 CE of the no-grad forward),
  not on an extra evaluation pass over the training set; it uses the previous epoch's losses;
- both peers train in the same step on the same batch, each with the other's division, instead
  of one epoch each, and the labelled and unlabelled parts are the two sides of one batch rather
  than two loaders. A step costs 4 no-grad forwards of B images and 2 forward + backward passes
  of 2B mixed images: about 4 times the CE baseline's compute per epoch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dtrain.config import MethodConfig
from dtrain.methods import losses
from dtrain.methods.division import divide
from dtrain.methods.memory import MemoryRule
from dtrain.methods.model import CoTeachingNet
from dtrain.methods.steps import StepContext, StepOutput


def division_rule(cfg: MethodConfig, num_classes: int) -> MemoryRule:
    """Per sample: each peer's clean probability from the GMM of the epoch's losses, and the
    given label (the steps hand back both peers' losses and the label); everything counts as
    clean before the first division."""

    def end_epoch(previous: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        per_class = cfg.dividemix_divide == "per_class"
        losses_seen, labels = observed[:, :2].double().numpy(), observed[:, 2].numpy()
        division = np.stack([divide(losses_seen[:, k], labels, per_class) for k in range(2)], 1)
        new = torch.from_numpy(division).to(previous.dtype)
        return torch.cat([new, observed[:, 2:].to(previous.dtype)], 1)

    return MemoryRule(initial=(1.0, 1.0, -1.0), end_epoch=end_epoch)


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    powered = p ** (1 / temperature)
    return powered / powered.sum(-1, keepdim=True)


def mixmatch_loss(
    logits: torch.Tensor,
    mixed_targets: torch.Tensor,
    labelled: torch.Tensor,
    valid: torch.Tensor,
    lambda_u: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_X + lambda_u L_U + L_reg on the mixed rows; `labelled` marks the rows whose first
    component was labelled, `valid` the rows mixed from two real samples."""
    log_p = F.log_softmax(losses.wide(logits), -1)
    p = log_p.exp()
    l_x = losses.masked_mean(-(mixed_targets * log_p).sum(-1), labelled & valid)
    l_u = losses.masked_mean(((p - mixed_targets) ** 2).mean(-1), ~labelled & valid)
    prior = torch.full_like(p[0], 1 / p.shape[1])
    mean_p = (p * valid[:, None]).sum(0) / valid.sum().clamp_min(1)
    l_reg = (prior * (prior / mean_p.clamp_min(1e-12)).log()).sum()
    terms = {"l_x": l_x.detach(), "l_u": l_u.detach(), "l_reg": l_reg.detach()}
    return l_x + lambda_u * l_u + l_reg, terms


def dividemix_step(model: CoTeachingNet, batch: dict, ctx: StepContext) -> StepOutput:
    """Warm-up CE, then each peer's MixMatch on the other's division (the module docstring)."""
    cfg, peers = ctx.cfg, model.peers
    x1, x2, labels, valid = batch["view1"], batch["view2"], batch["label"], batch["valid"]
    if ctx.epoch < cfg.warmup_epochs:
        logits = [peer(x1) for peer in peers]
        ce = [F.cross_entropy(losses.wide(z), labels, reduction="none") for z in logits]
        loss = losses.masked_mean(ce[0], valid) + losses.masked_mean(ce[1], valid)
        seen = torch.stack([c.detach() for c in ce] + [labels.float()], 1)
        return StepOutput(loss, logits[0].detach(), seen[:, 0], None, {"ce": loss.detach()}, seen)
    with torch.no_grad():
        views = [[peer(x) for x in (x1, x2)] for peer in peers]
        probs = [[z.float().softmax(-1) for z in pair] for pair in views]
        seen = torch.stack(
            [F.cross_entropy(losses.wide(pair[0]), labels, reduction="none") for pair in views]
            + [labels.float()],
            1,
        )
        guess = sharpen(sum(p for pair in probs for p in pair) / 4, cfg.dividemix_sharpen)
    one_hot = F.one_hot(labels, ctx.num_classes).float()
    ramp = min(1.0, (ctx.epoch - cfg.warmup_epochs + 1) / cfg.dividemix_rampup_epochs)
    loss, terms = torch.zeros((), device=x1.device), {}  # terms: summed over the peers
    for k, peer in enumerate(peers):
        w = batch["memory"][:, 1 - k].float()  # the peer's division
        labelled = (w > cfg.dividemix_threshold) & valid
        refined = w[:, None] * one_hot + (1 - w[:, None]) * (probs[k][0] + probs[k][1]) / 2
        target = torch.where(labelled[:, None], sharpen(refined, cfg.dividemix_sharpen), guess)
        inputs, targets = torch.cat([x1, x2]), torch.cat([target, target])
        lam = losses.sample_lam(1, cfg.dividemix_alpha, x1.device)[0]
        lam = torch.maximum(lam, 1 - lam)
        perm = torch.randperm(len(inputs), device=inputs.device)
        both_valid = torch.cat([valid, valid])
        mixed = peer(lam * inputs + (1 - lam) * inputs[perm])
        part, peer_terms = mixmatch_loss(
            mixed,
            lam * targets + (1 - lam) * targets[perm],
            torch.cat([labelled, labelled]),
            both_valid & both_valid[perm],
            cfg.dividemix_lambda_u * ramp,
        )
        loss = loss + part
        peer_terms["labelled"] = losses.masked_mean(labelled.float(), valid) / 2  # a fraction
        for name, value in peer_terms.items():
            terms[name] = terms.get(name, 0) + value
    return StepOutput(loss, views[0][0], seen[:, 0], None, terms, seen)
