"""Fused Triton ops for intra-group attention mixup, forward and backward.

(a) `pair_mix(h, groups, w)`: mixed features M[p] = w_p h_i + (1 - w_p) h_j for every pair
    (i, j) of every group, one program per (group, feature block), so a group's K rows come from
    memory once and stay in cache for all K(K-1)/2 pairs; backward writes dH group by group
    (groups partition the batch: no atomics) and dw.
(b) `pair_mix_loss(z, groups, w, labels, pair_valid)`: the mean soft-target cross-entropy of
    the mixed logits, computed with its gradients to Z and w in the same pass, never
    materialising mixed features.

The pair weights w come from the attention and lam (dtrain.methods.losses.pair_weight) in plain
torch: they are G*K(K-1)/2 numbers, so autograd carries dw on to the attention. Triton runs for CUDA
tensors; CPU tensors use the torch reference, unless `backend="triton"` forces the kernels
through Triton's interpreter (TRITON_INTERPRET=1 before import, as the tests do). Inputs may
be fp32, fp16 or bf16; accumulation is fp32.
"""

from __future__ import annotations

import os

import torch

MAX_GROUP = 32
MAX_FEATURES = 8192
MAX_CLASSES = 1024

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor, backend: str = "auto") -> bool:
    """auto: Triton on CUDA (or under the interpreter), torch elsewhere; or force one."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"mixup backend {backend!r} must be auto, triton or torch")
    if backend == "torch":
        return False
    if backend == "auto":
        return triton is not None and t.is_cuda
    if triton is None or not (t.is_cuda or _interpreting()):
        raise RuntimeError(
            "the Triton mixup backend needs triton and a CUDA tensor (or "
            "TRITON_INTERPRET=1 set before dtrain is imported)"
        )
    return True


def check_shapes(
    values: torch.Tensor, groups: torch.Tensor, w: torch.Tensor, limit: int, what: str
) -> None:
    b, width = values.shape
    g, k = groups.shape
    if not 2 <= k <= MAX_GROUP:
        raise ValueError(f"group size {k} must lie in 2..{MAX_GROUP}")
    if g * k != b:
        raise ValueError(f"groups {tuple(groups.shape)} must partition the batch of {b}")
    if width > limit:
        raise ValueError(f"{what} {width} exceeds the fused op's limit {limit}")
    if w.shape != (g, k * (k - 1) // 2):
        raise ValueError(
            f"pair weights {tuple(w.shape)} must be (G, K(K-1)/2) = ({g}, {k * (k - 1) // 2})"
        )


def pair_tables(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-group member positions of every unordered pair, in dtrain.methods.losses order."""
    first, second = torch.triu_indices(k, k, offset=1, device=device)
    return first.to(torch.int32).contiguous(), second.to(torch.int32).contiguous()


# -- torch reference ----------------------------------------------------------------------------


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    """fp32 accumulation for fp32/fp16/bf16; fp64 stays fp64 (the tests' exact reference)."""
    return x if x.dtype == torch.float64 else x.float()


def pair_mix_reference(h: torch.Tensor, groups: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    first, second = pair_tables(groups.shape[1], h.device)
    i, j = groups[:, first.long()].reshape(-1), groups[:, second.long()].reshape(-1)
    weight = _accumulate(w.reshape(-1, 1))
    return (weight * _accumulate(h[i]) + (1 - weight) * _accumulate(h[j])).to(h.dtype)


def pair_mix_loss_reference(
    z: torch.Tensor,
    groups: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    pair_valid: torch.Tensor,
) -> torch.Tensor:
    first, second = pair_tables(groups.shape[1], z.device)
    i, j = groups[:, first.long()].reshape(-1), groups[:, second.long()].reshape(-1)
    weight = _accumulate(w.reshape(-1, 1))
    mixed = weight * _accumulate(z[i]) + (1 - weight) * _accumulate(z[j])
    onehot = torch.nn.functional.one_hot(labels, z.shape[1]).to(mixed.dtype)
    targets = weight * onehot[i] + (1 - weight) * onehot[j]
    per_pair = -(targets * mixed.log_softmax(-1)).sum(-1)
    valid = pair_valid.reshape(-1).to(per_pair.dtype)
    return (per_pair * valid).sum() / valid.sum().clamp_min(1)


# -- Triton kernels -----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mix_forward(
        h_ptr, groups_ptr, w_ptr, first_ptr, second_ptr, out_ptr, D, K, P, BLOCK_D: tl.constexpr
    ):
        g = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = cols < D
        for p in range(P):
            i = tl.load(groups_ptr + g * K + tl.load(first_ptr + p)).to(tl.int64)
            j = tl.load(groups_ptr + g * K + tl.load(second_ptr + p)).to(tl.int64)
            weight = tl.load(w_ptr + g * P + p).to(tl.float32)
            hi = tl.load(h_ptr + i * D + cols, mask=inside, other=0.0).to(tl.float32)
            hj = tl.load(h_ptr + j * D + cols, mask=inside, other=0.0).to(tl.float32)
            mixed = weight * hi + (1 - weight) * hj
            row = (g * P + p).to(tl.int64)
            tl.store(out_ptr + row * D + cols, mixed.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _mix_backward(
        h_ptr,
        groups_ptr,
        w_ptr,
        first_ptr,
        second_ptr,
        dout_ptr,
        dh_ptr,
        dw_ptr,
        D,
        K,
        P,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        g = tl.program_id(0)
        block = tl.program_id(1)
        cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = cols < D
        members = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
        for p in range(P):
            a = tl.load(first_ptr + p)
            b = tl.load(second_ptr + p)
            i = tl.load(groups_ptr + g * K + a).to(tl.int64)
            j = tl.load(groups_ptr + g * K + b).to(tl.int64)
            weight = tl.load(w_ptr + g * P + p).to(tl.float32)
            row = (g * P + p).to(tl.int64)
            dm = tl.load(dout_ptr + row * D + cols, mask=inside, other=0.0).to(tl.float32)
            hi = tl.load(h_ptr + i * D + cols, mask=inside, other=0.0).to(tl.float32)
            hj = tl.load(h_ptr + j * D + cols, mask=inside, other=0.0).to(tl.float32)
            acc += tl.where((members == a)[:, None], weight * dm[None, :], 0.0)
            acc += tl.where((members == b)[:, None], (1 - weight) * dm[None, :], 0.0)
            # partial dw of this feature block; the blocks are summed afterwards
            tl.store(
                dw_ptr + block * (tl.num_programs(0) * P) + g * P + p,
                tl.sum(dm * (hi - hj), axis=0),
            )
        rows = tl.load(groups_ptr + g * K + members, mask=members < K, other=0).to(tl.int64)
        mask = (members < K)[:, None] & inside[None, :]
        tl.store(
            dh_ptr + rows[:, None] * D + cols[None, :], acc.to(dh_ptr.dtype.element_ty), mask=mask
        )

    @triton.jit
    def _mix_loss(
        z_ptr,
        groups_ptr,
        w_ptr,
        labels_ptr,
        valid_ptr,
        first_ptr,
        second_ptr,
        loss_ptr,
        dz_ptr,
        dw_ptr,
        C,
        K,
        P,
        BLOCK_C: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per group: sum over its valid pairs of the soft-target CE of the mixed logits, and
        the (unscaled) gradients of that sum to Z (rows of this group) and to w."""
        g = tl.program_id(0)
        cls = tl.arange(0, BLOCK_C)
        inside = cls < C
        members = tl.arange(0, BLOCK_K)
        dz = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        total = 0.0
        for p in range(P):
            a = tl.load(first_ptr + p)
            b = tl.load(second_ptr + p)
            i = tl.load(groups_ptr + g * K + a).to(tl.int64)
            j = tl.load(groups_ptr + g * K + b).to(tl.int64)
            weight = tl.load(w_ptr + g * P + p).to(tl.float32)
            valid = tl.load(valid_ptr + g * P + p).to(tl.float32)
            zi = tl.load(z_ptr + i * C + cls, mask=inside, other=0.0).to(tl.float32)
            zj = tl.load(z_ptr + j * C + cls, mask=inside, other=0.0).to(tl.float32)
            yi = tl.load(labels_ptr + i)
            yj = tl.load(labels_ptr + j)
            mixed = tl.where(inside, weight * zi + (1 - weight) * zj, float("-inf"))
            peak = tl.max(mixed, axis=0)
            exp = tl.where(inside, tl.exp(mixed - peak), 0.0)
            lse = peak + tl.log(tl.sum(exp, axis=0))
            prob = exp / tl.sum(exp, axis=0)
            target = weight * (cls == yi).to(tl.float32) + (1 - weight) * (cls == yj).to(tl.float32)
            logp_i = tl.sum(tl.where(cls == yi, mixed, 0.0), axis=0) - lse
            logp_j = tl.sum(tl.where(cls == yj, mixed, 0.0), axis=0) - lse
            total += valid * -(weight * logp_i + (1 - weight) * logp_j)
            diff = tl.where(inside, prob - target, 0.0) * valid
            dz += tl.where((members == a)[:, None], weight * diff[None, :], 0.0)
            dz += tl.where((members == b)[:, None], (1 - weight) * diff[None, :], 0.0)
            dw = tl.sum(diff * (zi - zj), axis=0) - valid * (logp_i - logp_j)
            tl.store(dw_ptr + g * P + p, dw)
        tl.store(loss_ptr + g, total)
        rows = tl.load(groups_ptr + g * K + members, mask=members < K, other=0).to(tl.int64)
        mask = (members < K)[:, None] & inside[None, :]
        tl.store(dz_ptr + rows[:, None] * C + cls[None, :], dz, mask=mask)


def _block(n: int, cap: int) -> int:
    return min(cap, triton.next_power_of_2(n))


class PairMix(torch.autograd.Function):
    """(a): mixed features of every pair; gradients to h and w."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, groups: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h, groups, w = h.contiguous(), groups.to(torch.int32).contiguous(), w.contiguous()
        g, k = groups.shape
        p = k * (k - 1) // 2
        d = h.shape[1]
        first, second = pair_tables(k, h.device)
        out = torch.empty(g * p, d, device=h.device, dtype=h.dtype)
        block = _block(d, 1024)
        _mix_forward[(g, triton.cdiv(d, block))](
            h, groups, w, first, second, out, d, k, p, BLOCK_D=block
        )
        ctx.save_for_backward(h, groups, w, first, second)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, groups, w, first, second = ctx.saved_tensors
        g, k = groups.shape
        p = k * (k - 1) // 2
        d = h.shape[1]
        block = _block(d, 256)
        blocks = triton.cdiv(d, block)
        dh = torch.empty(h.shape, device=h.device, dtype=torch.float32)
        dw_parts = torch.empty(blocks, g * p, device=h.device, dtype=torch.float32)
        _mix_backward[(g, blocks)](
            h,
            groups,
            w,
            first,
            second,
            grad.contiguous(),
            dh,
            dw_parts,
            d,
            k,
            p,
            BLOCK_D=block,
            BLOCK_K=triton.next_power_of_2(k),
        )
        return dh.to(h.dtype), None, dw_parts.sum(0).view(g, p).to(w.dtype)


class PairMixLoss(torch.autograd.Function):
    """(b): mean soft-target CE over valid pairs, from the logits; gradients in one pass."""

    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        groups: torch.Tensor,
        w: torch.Tensor,
        labels: torch.Tensor,
        pair_valid: torch.Tensor,
    ) -> torch.Tensor:
        z, groups, w = z.contiguous(), groups.to(torch.int32).contiguous(), w.contiguous()
        g, k = groups.shape
        p = k * (k - 1) // 2
        c = z.shape[1]
        first, second = pair_tables(k, z.device)
        valid = pair_valid.to(torch.float32).contiguous()
        losses = torch.empty(g, device=z.device, dtype=torch.float32)
        dz = torch.empty(z.shape, device=z.device, dtype=torch.float32)
        dw = torch.empty(g, p, device=z.device, dtype=torch.float32)
        _mix_loss[(g,)](
            z,
            groups,
            w,
            labels.to(torch.int64).contiguous(),
            valid,
            first,
            second,
            losses,
            dz,
            dw,
            c,
            k,
            p,
            BLOCK_C=triton.next_power_of_2(c),
            BLOCK_K=triton.next_power_of_2(k),
        )
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(dz / count, dw / count)
        ctx.dtypes = (z.dtype, w.dtype)
        return losses.sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dz, dw = ctx.saved_tensors
        z_dtype, w_dtype = ctx.dtypes
        return (dz * grad).to(z_dtype), None, (dw * grad).to(w_dtype), None, None


def pair_mix(
    h: torch.Tensor, groups: torch.Tensor, w: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Mixed features [G*P, D] of every pair of every group (pair order of
    dtrain.methods.losses)."""
    check_shapes(h, groups, w, MAX_FEATURES, "feature size")
    if use_triton(h, backend):
        return PairMix.apply(h, groups, w)
    return pair_mix_reference(h, groups, w)


def pair_mix_loss(
    z: torch.Tensor,
    groups: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    pair_valid: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """L_iam from the logits: mean over valid pairs of CE(w z_i + (1-w) z_j, soft target)."""
    check_shapes(z, groups, w, MAX_CLASSES, "class count")
    if use_triton(z, backend):
        return PairMixLoss.apply(z, groups, w, labels, pair_valid)
    return pair_mix_loss_reference(z, groups, w, labels, pair_valid)
