"""Values of the losses in dtrain/losses.py (and of GroupAttention) against references written out
here by hand or in plain Python, on small explicit tensors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from dtrain.methods import losses
from dtrain.methods.model import GroupAttention


def log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    norm = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - norm for x in row]


def ce(row: list[float], target: list[float]) -> float:
    return -sum(t * lp for t, lp in zip(target, log_softmax(row), strict=True))


def test_soft_cross_entropy_and_masked_mean():
    """Per-row soft CE by hand; masked_mean drops a masked row, is a plain mean without mask."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    per_row = losses.soft_cross_entropy(logits, targets)
    # row 1: p = (3/4, 1/4) -> -(0.5 log 3/4 + 0.5 log 1/4); row 2: -log(e^-1 / (e + e^-1))
    expected = [math.log(2), -0.5 * math.log(0.75) - 0.5 * math.log(0.25), math.log(1 + math.e**2)]
    torch.testing.assert_close(per_row, torch.tensor(expected))
    valid = torch.tensor([True, False, True])
    mean = losses.masked_mean(per_row, valid)
    assert mean.item() == pytest.approx((expected[0] + expected[2]) / 2, rel=1e-6)
    assert losses.masked_mean(per_row, None).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert losses.masked_mean(per_row, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def nt_xent_reference(z1: list, z2: list, tau: float) -> float:
    """NT-Xent in plain Python: view a's positive is the other view of its image, the other 2B-2
    views are its negatives; mean over the 2B views."""
    views, n = z1 + z2, len(z1)
    total = 0.0
    for a, va in enumerate(views):
        sims = [sum(x * y for x, y in zip(va, vb, strict=True)) / tau for vb in views]
        pos = (a + n) % (2 * n)
        total += -sims[pos] + math.log(sum(math.exp(s) for b, s in enumerate(sims) if b != a))
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_nt_xent_two_images_by_hand(tau):
    """Two orthogonal images seen twice identically: every view has sim 1 to its positive and 0 to
    two negatives, so the loss is log(1 + 2 exp(-1/tau)). A less symmetric case matches the
    plain-Python formula."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert losses.nt_xent(z, z.clone(), tau).item() == pytest.approx(
        math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6
    )
    z1 = [[1.0, 0.0], [0.0, 1.0]]
    z2 = [[0.6, 0.8], [-0.8, 0.6]]
    got = losses.nt_xent(torch.tensor(z1), torch.tensor(z2), tau).item()
    assert got == pytest.approx(nt_xent_reference(z1, z2, tau), rel=1e-6)


def test_nt_xent_gradient_matches_finite_difference():
    """d loss / d z1 by autograd equals a central difference of the float64 reference (nt_xent
    computes in float32, so gradcheck in float64 does not apply)."""
    z1 = [[1.0, 0.0], [0.0, 1.0]]
    z2 = [[0.6, 0.8], [-0.8, 0.6]]
    leaf = torch.tensor(z1, requires_grad=True)
    losses.nt_xent(leaf, torch.tensor(z2), 0.5).backward()
    eps = 1e-6
    numeric = np.zeros((2, 2))
    for r, c in itertools.product(range(2), range(2)):
        plus = [row[:] for row in z1]
        minus = [row[:] for row in z1]
        plus[r][c] += eps
        minus[r][c] -= eps
        diff = nt_xent_reference(plus, z2, 0.5) - nt_xent_reference(minus, z2, 0.5)
        numeric[r, c] = diff / (2 * eps)
    np.testing.assert_allclose(leaf.grad.numpy(), numeric, atol=1e-5)


def pair_set(pairs: tuple) -> set:
    return {frozenset((int(i), int(j))) for i, j in zip(*pairs, strict=True)}


def test_group_pairs_all_unordered_pairs_within_groups():
    """Exactly the unordered pairs inside each group, G*K(K-1)/2 of them, no duplicates."""
    pairs = losses.group_pairs(torch.tensor([[0, 3], [1, 2]]))
    assert pair_set(pairs) == {frozenset((0, 3)), frozenset((1, 2))}
    pairs = losses.group_pairs(torch.tensor([[5, 1, 4], [0, 2, 3]]))
    assert pair_set(pairs) == {
        frozenset(p) for p in [(5, 1), (5, 4), (1, 4), (0, 2), (0, 3), (2, 3)]
    }
    torch.manual_seed(1)
    groups = losses.make_groups(12, 4)
    pairs = losses.group_pairs(groups)
    expected = {frozenset(p) for g in groups.tolist() for p in itertools.combinations(g, 2)}
    assert len(pairs[0]) == 3 * 4 * 3 // 2 == len(expected)
    assert pair_set(pairs) == expected


def test_pair_weight_hand_values():
    """w_i = lam a_i / (lam a_i + (1-lam) a_j) by hand, and w_i + w_j = 1."""
    a_i, a_j = torch.tensor([0.8, 0.8, 0.5]), torch.tensor([0.2, 0.2, 0.5])
    lam = torch.tensor([0.5, 0.25, 0.75])
    w_i = losses.pair_weight(a_i, a_j, lam)
    torch.testing.assert_close(w_i, torch.tensor([0.8, 0.2 / 0.35, 0.75]))
    w_j = losses.pair_weight(a_j, a_i, 1 - lam)
    torch.testing.assert_close(w_i + w_j, torch.ones(3))


def test_sample_lam():
    """alpha <= 0 gives exactly 0.5; alpha > 0 draws in (0, 1), reproducible under a seed, with
    Beta(alpha, alpha)'s mean 1/2 and variance 1 / (4 (2 alpha + 1))."""
    for alpha in (0.0, -1.0):
        assert torch.equal(losses.sample_lam(7, alpha), torch.full((7,), 0.5))
    torch.manual_seed(3)
    first = losses.sample_lam(20000, 0.4)
    torch.manual_seed(3)
    assert torch.equal(first, losses.sample_lam(20000, 0.4))
    assert bool(((first > 0) & (first < 1)).all())
    assert first.mean().item() == pytest.approx(0.5, abs=0.01)
    assert first.var().item() == pytest.approx(1 / (4 * 1.8), abs=0.01)


def iam_reference(logits, attention, labels, pairs, lam, valid) -> float:
    """L_iam written out pair by pair in plain Python (logit space)."""
    per_pair = []
    for i, j, lm in zip(pairs[0].tolist(), pairs[1].tolist(), lam.tolist(), strict=True):
        if not (valid[i] and valid[j]):
            continue
        w = lm * attention[i] / (lm * attention[i] + (1 - lm) * attention[j])
        mixed = [w * x + (1 - w) * y for x, y in zip(logits[i], logits[j], strict=True)]
        target = [w * (c == labels[i]) + (1 - w) * (c == labels[j]) for c in range(len(mixed))]
        per_pair.append(ce(mixed, target))
    return sum(per_pair) / len(per_pair)


def test_intra_group_mixup_logit_path_by_hand():
    """B=4, C=2, K=2: pair (0,2) has w=0.8, pair (1,3) has w=0.25 (equal attention, lam=0.25)."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
    attention = torch.tensor([0.8, 0.5, 0.2, 0.5])
    labels = torch.tensor([0, 1, 1, 0])
    groups = torch.tensor([[0, 2], [1, 3]])
    lam = torch.tensor([0.5, 0.25])
    got = losses.intra_group_mixup(logits, attention, labels, groups, lam, 2)
    # pair (0,2): mixed 0.8*[2,0] + 0.2*[1,1] = [1.8, 0.2], target [0.8, 0.2]
    # pair (1,3): mixed 0.25*[0,1] + 0.75*[-1,0.5] = [-0.75, 0.625], target [0.75, 0.25]
    first = 0.8 * math.log(1 + math.exp(0.2 - 1.8)) + 0.2 * math.log(1 + math.exp(1.8 - 0.2))
    second = 0.75 * math.log(1 + math.exp(1.375)) + 0.25 * math.log(1 + math.exp(-1.375))
    assert got.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_intra_group_mixup_feature_and_logit_paths_agree():
    """The logit-space shortcut is exact: same loss and same gradients w.r.t. h, the attention and
    the head's parameters as the feature-space path (B=16, D=32, C=3, K=4)."""
    torch.manual_seed(7)
    h0, att0 = torch.randn(16, 32), torch.rand(16) * 0.9 + 0.05
    labels = torch.randint(0, 3, (16,))
    groups = losses.make_groups(16, 4)
    pairs = losses.group_pairs(groups)
    lam = losses.sample_lam(len(pairs[0]), 1.0)
    head = nn.Linear(32, 3)
    results = []
    for feature_space in (True, False):
        head.zero_grad()
        h, att = h0.clone().requires_grad_(), att0.clone().requires_grad_()
        values, used_head = (h, head) if feature_space else (head(h), None)
        loss = losses.intra_group_mixup(values, att, labels, groups, lam, 3, head=used_head)
        loss.backward()
        grads = [h.grad, att.grad, head.weight.grad.clone(), head.bias.grad.clone()]
        results.append((loss.detach(), grads))
    (loss_f, grads_f), (loss_l, grads_l) = results
    torch.testing.assert_close(loss_f, loss_l, rtol=1e-5, atol=1e-6)
    for gf, gl in zip(grads_f, grads_l, strict=True):
        torch.testing.assert_close(gf, gl, rtol=1e-5, atol=1e-6)


def test_intra_group_mixup_valid_mask():
    """Pairs touching a padding sample do not count: the loss equals the plain-Python mean over
    the remaining pairs, and the padding samples' values do not matter."""
    torch.manual_seed(11)
    logits, attention = torch.randn(8, 3), torch.rand(8) * 0.9 + 0.05
    labels = torch.randint(0, 3, (8,))
    groups = losses.make_groups(8, 4)
    pairs = losses.group_pairs(groups)
    lam = losses.sample_lam(len(pairs[0]), 1.0)
    valid = torch.tensor([True, True, False, True, True, True, True, False])
    got = losses.intra_group_mixup(logits, attention, labels, groups, lam, 3, valid=valid)
    expected = iam_reference(
        logits.tolist(), attention.tolist(), labels.tolist(), pairs, lam, valid.tolist()
    )
    assert got.item() == pytest.approx(expected, rel=1e-5)
    changed = logits.clone()
    changed[~valid] = 100.0
    again = losses.intra_group_mixup(changed, attention, labels, groups, lam, 3, valid=valid)
    torch.testing.assert_close(again, got)


def test_intra_group_mixup_special_cases():
    """alpha=0 with equal attention is plain 50/50 mixup; K=2 gives exactly B/2 disjoint pairs."""
    torch.manual_seed(5)
    logits, labels = torch.randn(6, 3), [0, 1, 2, 2, 1, 0]
    groups = losses.make_groups(6, 2)
    pairs = losses.group_pairs(groups)
    assert len(pairs[0]) == 3
    assert sorted(pairs[0].tolist() + pairs[1].tolist()) == list(range(6))
    lam = losses.sample_lam(3, 0.0)
    got = losses.intra_group_mixup(
        logits, torch.full((6,), 0.3), torch.tensor(labels), groups, lam, 3
    )
    expected = 0.0
    for i, j in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        mixed = [
            0.5 * x + 0.5 * y for x, y in zip(logits[i].tolist(), logits[j].tolist(), strict=True)
        ]
        target = [0.5 * (c == labels[i]) + 0.5 * (c == labels[j]) for c in range(3)]
        expected += ce(mixed, target) / 3
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_afm_loss_matches_definition(with_mask):
    """i with i + B/2, w = a_i / (a_i + a_j), mixed feature through the head, 0.5/0.5 targets,
    1.5 * mixed + 0.5 * plain CE; padding drops its pairs and its plain CE term."""
    torch.manual_seed(2)
    h, attention = torch.randn(6, 4), torch.rand(6) * 0.9 + 0.05
    labels, head = torch.tensor([0, 2, 1, 1, 0, 2]), nn.Linear(4, 3)
    valid = torch.tensor([True, True, True, True, False, True]) if with_mask else None
    got = losses.afm_loss(h, attention, labels, head, 3, valid)
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    hn, an, yn = h.numpy(), attention.numpy(), labels.tolist()
    ok = [True] * 6 if valid is None else valid.tolist()
    mixed_terms, plain_terms = [], []
    for i in range(3):
        j = i + 3
        w = an[i] / (an[i] + an[j])
        row = (weight @ (w * hn[i] + (1 - w) * hn[j]) + bias).tolist()
        target = [0.5 * (c == yn[i]) + 0.5 * (c == yn[j]) for c in range(3)]
        if ok[i] and ok[j]:
            mixed_terms.append(ce(row, target))
    for i in range(6):
        if ok[i]:
            plain_terms.append(ce((weight @ hn[i] + bias).tolist(), [c == yn[i] for c in range(3)]))
    expected = 1.5 * np.mean(mixed_terms) + 0.5 * np.mean(plain_terms)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_gce_and_sce_hand_values():
    """GCE (1 - p_y^q)/q at q=0.7; q=0 is CE and q=1e-4 is close to CE; SCE is
    alpha CE + beta (-log 1e-4) (1 - p_y)."""
    logits, labels = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    p = [math.exp(2) / (math.exp(2) + 1 + math.exp(-1)), 1 / (2 + math.e)]
    gce = losses.gce_loss(logits, labels, 0.7)
    torch.testing.assert_close(gce, torch.tensor([(1 - x**0.7) / 0.7 for x in p]))
    ce_values = torch.tensor([-math.log(x) for x in p])
    torch.testing.assert_close(losses.gce_loss(logits, labels, 0.0), ce_values)
    torch.testing.assert_close(losses.gce_loss(logits, labels, 1e-4), ce_values, rtol=1e-3, atol=0)
    sce = losses.sce_loss(logits, labels, alpha=0.1, beta=1.0)
    expected = [0.1 * -math.log(x) + 1.0 * -math.log(1e-4) * (1 - x) for x in p]
    torch.testing.assert_close(sce, torch.tensor(expected))


def test_coteaching_small_loss_selection():
    """Each peer learns from the other's (1 - forget_rate) smallest-loss samples; padding is
    never picked. Logits [s, 0] with label 0 give CE log(1 + e^-s)."""
    s1, s2 = [3.0, -1.0, 1.0, 0.0], [-2.0, 2.0, 0.0, 1.0]
    logits1 = torch.tensor([[s, 0.0] for s in s1])
    logits2 = torch.tensor([[s, 0.0] for s in s2])
    labels = torch.zeros(4, dtype=torch.long)
    l1 = [math.log(1 + math.exp(-s)) for s in s1]  # smallest: 0, 2
    l2 = [math.log(1 + math.exp(-s)) for s in s2]  # smallest: 1, 3
    got = losses.coteaching_loss(logits1, logits2, labels, 0.5)
    assert got.item() == pytest.approx((l1[1] + l1[3]) / 2 + (l2[0] + l2[2]) / 2, rel=1e-6)
    # sample 1 (net 2's smallest loss) is padding: keep ceil(0.5 * 3) = 2, net 2 picks 3 and 2
    valid = torch.tensor([True, False, True, True])
    got = losses.coteaching_loss(logits1, logits2, labels, 0.5, valid)
    assert got.item() == pytest.approx((l1[3] + l1[2]) / 2 + (l2[0] + l2[2]) / 2, rel=1e-6)
    got = losses.coteaching_loss(logits1, logits2, labels, 0.0)
    assert got.item() == pytest.approx(sum(l1) / 4 + sum(l2) / 4, rel=1e-6)


def attention_inputs(seed: int = 0):
    torch.manual_seed(seed)
    return torch.randn(3, 4, 8), torch.randint(0, 3, (3, 4)), torch.randn(3, 4, 3)


def test_group_attention_shape_and_inputs():
    """[G, K] weights in (0, 1); the feature-only block ignores labels, the full block does not."""
    h, labels, logits = attention_inputs()
    other = (labels + 1) % 3
    torch.manual_seed(0)
    feature_only = GroupAttention(8, 3, 16, "feature")
    out = feature_only(h, labels, logits)
    assert out.shape == (3, 4) and bool(((out > 0) & (out < 1)).all())
    torch.testing.assert_close(feature_only(h, other, logits), out)
    full = GroupAttention(8, 3, 16, "feature+label+confidence")
    out = full(h, labels, logits)
    assert out.shape == (3, 4) and bool(((out > 0) & (out < 1)).all())
    assert not torch.allclose(full(h, other, logits), out)


def test_group_attention_gradients_reach_h_not_logits():
    """The confidence input comes from detached logits: h gets a gradient, logits none."""
    h, labels, logits = attention_inputs(1)
    h.requires_grad_()
    logits.requires_grad_()
    torch.manual_seed(0)
    GroupAttention(8, 3, 16, "feature+label+confidence")(h, labels, logits).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert logits.grad is None


def test_coteaching_all_padding_batch_counts_nothing():
    """With every sample padding, no sample may count: keep = max(1, 0) still picks one."""
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    valid = torch.zeros(2, dtype=torch.bool)
    loss = losses.coteaching_loss(logits, logits, torch.tensor([0, 0]), 0.5, valid)
    assert loss.item() == 0.0


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
