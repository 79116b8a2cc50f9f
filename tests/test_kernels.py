"""The fused Triton mixup ops, run through Triton's interpreter on CPU tensors, against the torch
reference: forward and backward, fp32 / fp16 / bf16, shapes that do not fill a block."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch

from dtrain.config import load_config
from dtrain.train import mixup_kernels as mk
from dtrain.train.losses import make_groups
from dtrain.train.model import build_model
from dtrain.train.steps import training_step

# The reference runs in float64 on the same (rounded) inputs. fp32 must match to rtol 1e-5;
# half-precision outputs are rounded once at the end (the kernel accumulates in fp32), so they
# may differ by a few units in the last place of the largest value.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rtol = RTOL[dtype]
    atol = rtol * float(want.detach().abs().max()) + 1e-7
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


SHAPES = [(8, 2, 5, 3), (16, 4, 37, 7), (12, 3, 130, 10), (32, 8, 300, 2), (64, 32, 20, 5)]


def inputs(b: int, k: int, width: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    groups = make_groups(b, k)
    w = (torch.rand(b // k, k * (k - 1) // 2) * 0.9 + 0.05).requires_grad_()
    values = torch.randn(b, width).to(dtype).requires_grad_()
    return groups, w, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k, d, c", SHAPES)
def test_pair_mix_matches_the_reference(b, k, d, c, dtype):
    groups, w, h = inputs(b, k, d, dtype)
    out = mk.pair_mix(h, groups, w, backend="triton")
    grad = torch.randn(out.shape).to(dtype)
    dh, dw = torch.autograd.grad(out, (h, w), grad)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = mk.pair_mix(h64, groups, w64, backend="torch")
    dh_ref, dw_ref = torch.autograd.grad(ref, (h64, w64), grad.double())
    assert out.shape == (b // k * k * (k - 1) // 2, d) and out.dtype == dtype
    assert dh.dtype == dtype
    close(out, ref, dtype)
    close(dh, dh_ref, dtype)
    close(dw, dw_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k, d, c", SHAPES)
def test_pair_mix_loss_matches_the_reference(b, k, d, c, dtype):
    groups, w, z = inputs(b, k, c, dtype, seed=1)
    labels = torch.randint(0, c, (b,))
    valid = torch.ones(w.shape, dtype=torch.bool)
    valid[0, 0] = False  # a pair touching padding
    loss = mk.pair_mix_loss(z, groups, w, labels, valid, backend="triton")
    dz, dw = torch.autograd.grad(loss * 3.0, (z, w))
    z64, w64 = z.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = mk.pair_mix_loss(z64, groups, w64, labels, valid, backend="torch")
    dz_ref, dw_ref = torch.autograd.grad(ref * 3.0, (z64, w64))
    close(loss, ref, torch.float32)  # the loss itself is accumulated and returned in fp32
    close(dz, dz_ref, dtype)
    close(dw, dw_ref, torch.float32)


def test_invalid_pairs_take_no_part():
    groups, w, z = inputs(8, 4, 3, torch.float32)
    labels = torch.randint(0, 3, (8,))
    valid = torch.ones(w.shape, dtype=torch.bool)
    valid[1] = False
    loss = mk.pair_mix_loss(z, groups, w, labels, valid, backend="triton")
    (dz,) = torch.autograd.grad(loss, (z,))
    assert dz[groups[1]].abs().max() == 0  # the second group's rows get no gradient


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            lambda: mk.pair_mix(torch.randn(10, 4), make_groups(10, 5)[:1], torch.rand(1, 10)),
            "must partition the batch",
        ),
        (
            lambda: mk.pair_mix(torch.randn(66, 4), make_groups(66, 33), torch.rand(2, 528)),
            r"group size 33 must lie in 2..32",
        ),
        (
            lambda: mk.pair_mix(torch.randn(4, 9000), make_groups(4, 2), torch.rand(2, 1)),
            "feature size 9000 exceeds",
        ),
        (
            lambda: mk.pair_mix_loss(
                torch.randn(4, 1200),
                make_groups(4, 2),
                torch.rand(2, 1),
                torch.zeros(4, dtype=torch.long),
                torch.ones(2, 1, dtype=bool),
            ),
            "class count 1200 exceeds",
        ),
        (
            lambda: mk.pair_mix(torch.randn(4, 3), make_groups(4, 2), torch.rand(2, 3)),
            r"pair weights \(2, 3\) must be",
        ),
    ],
)
def test_bad_shapes_are_refused_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_auto_dispatch_uses_torch_for_cpu_tensors():
    assert not mk.use_triton(torch.zeros(1), "auto")
    assert mk.use_triton(torch.zeros(1), "triton")  # interpreted here
    with pytest.raises(ValueError, match="must be auto, triton or torch"):
        mk.use_triton(torch.zeros(1), "cuda")


@pytest.mark.parametrize("space", ["logit", "feature"])
def test_the_trainer_step_gives_the_same_loss_with_either_path(space):
    results = {}
    for backend in ("torch", "triton"):
        cfg = load_config(
            None,
            [
                "model.backbone=test_resnet",
                "method.group_size=4",
                f"method.mixup_space={space}",
                f"method.mixup_backend={backend}",
            ],
        )
        torch.manual_seed(0)
        model = build_model(cfg.model, "iam", num_classes=3, in_chans=1)
        batch = random_batch()
        out = training_step(model, batch, cfg.method, 1, 3, 0.0)
        out.loss.backward()
        results[backend] = (out.terms["iam"], model.attention.score.weight.grad.clone())
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-6)


def test_reference_works_under_torch_compile():
    groups, w, z = inputs(16, 4, 5, torch.float32)
    labels = torch.randint(0, 5, (16,))
    valid = torch.ones(w.shape, dtype=torch.bool)
    compiled = torch.compile(mk.pair_mix_loss_reference, backend="eager", fullgraph=True)
    torch.testing.assert_close(
        compiled(z, groups, w, labels, valid),
        mk.pair_mix_loss_reference(z, groups, w, labels, valid),
    )
