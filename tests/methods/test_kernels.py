"""The fused Triton mixup ops against the torch reference: forward and backward, fp32 / fp16 /
bf16, shapes that do not fill a block.

Each kernel test runs on every device it can: "cpu" through Triton's interpreter
(TRITON_INTERPRET=1, which tests/conftest.py sets unless the environment already says
otherwise) and "cuda" compiled for the GPU when one is present and the interpreter is off
(benchmarks/gpu_check.sh exports TRITON_INTERPRET=0). A device that cannot run is skipped, unless
DTRAIN_TEST_DEVICE names it: then it fails, so that a GPU check cannot pass on skips alone."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import random_batch

from dtrain.config import load_config
from dtrain.methods import mixup_kernels as mk
from dtrain.methods.losses import make_groups
from dtrain.methods.model import build_model
from dtrain.methods.steps import training_step

# The reference runs in float64 on the same (rounded) inputs. fp32 must match to rtol 1e-5;
# half-precision outputs are rounded once at the end (the kernel accumulates in fp32), so they
# may differ by a few units in the last place of the largest value.
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def unusable(device: str) -> str | None:
    """Why the Triton kernels cannot run on `device` in this process, or None."""
    if mk.triton is None:
        return "triton is not installed"
    if device == "cpu" and not INTERPRETED:
        return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if device == "cuda" and INTERPRETED:
        return "TRITON_INTERPRET=1: the kernels would be interpreted, not compiled for the GPU"
    return None


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    reason = unusable(request.param)
    if reason:
        if os.environ.get("DTRAIN_TEST_DEVICE") == request.param:
            pytest.fail(f"DTRAIN_TEST_DEVICE={request.param}, but {reason}")
        pytest.skip(reason)
    return torch.device(request.param)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    rtol = RTOL[dtype]
    atol = rtol * float(want.detach().abs().max()) + 1e-7
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


SHAPES = [(8, 2, 5, 3), (16, 4, 37, 7), (12, 3, 130, 10), (32, 8, 300, 2), (64, 32, 20, 5)]
# Full blocks, K = 16 and 32, D = 8192, C = 1000: far too slow interpreted, so compiled only.
LARGE = [(256, 8, 2048, 10), (1024, 16, 512, 1000), (4096, 4, 8192, 3), (96, 32, 37, 7)]
if unusable("cuda") is None:
    SHAPES = SHAPES + LARGE


def skip_large_on_cpu(shape: tuple[int, int, int, int], device: torch.device) -> None:
    if shape in LARGE and device.type != "cuda":
        pytest.skip("large shapes run compiled on the GPU only")


def inputs(b: int, k: int, width: int, dtype: torch.dtype, device="cpu", seed: int = 0):
    """Drawn on the CPU, then moved: the same numbers on every device."""
    torch.manual_seed(seed)
    groups = make_groups(b, k).to(device)
    w = (torch.rand(b // k, k * (k - 1) // 2) * 0.9 + 0.05).to(device).requires_grad_()
    values = torch.randn(b, width).to(dtype).to(device).requires_grad_()
    return groups, w, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k, d, c", SHAPES)
@pytest.mark.slow
def test_pair_mix_matches_the_reference(b, k, d, c, dtype, device):
    skip_large_on_cpu((b, k, d, c), device)
    groups, w, h = inputs(b, k, d, dtype, device)
    out = mk.pair_mix(h, groups, w, backend="triton")
    grad = torch.randn(out.shape).to(dtype).to(device)
    dh, dw = torch.autograd.grad(out, (h, w), grad)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = mk.pair_mix(h64, groups, w64, backend="torch")
    dh_ref, dw_ref = torch.autograd.grad(ref, (h64, w64), grad.double())
    assert out.shape == (b // k * k * (k - 1) // 2, d) and out.dtype == dtype
    assert out.device == dh.device == dw.device == h.device
    assert dh.dtype == dtype
    close(out, ref, dtype)
    close(dh, dh_ref, dtype)
    close(dw, dw_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b, k, d, c", SHAPES)
@pytest.mark.slow
def test_pair_mix_loss_matches_the_reference(b, k, d, c, dtype, device):
    skip_large_on_cpu((b, k, d, c), device)
    groups, w, z = inputs(b, k, c, dtype, device, seed=1)
    labels = torch.randint(0, c, (b,)).to(device)
    valid = torch.ones(w.shape, dtype=torch.bool, device=device)
    valid[0, 0] = False  # a pair touching padding
    loss = mk.pair_mix_loss(z, groups, w, labels, valid, backend="triton")
    dz, dw = torch.autograd.grad(loss * 3.0, (z, w))
    z64, w64 = z.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = mk.pair_mix_loss(z64, groups, w64, labels, valid, backend="torch")
    dz_ref, dw_ref = torch.autograd.grad(ref * 3.0, (z64, w64))
    close(loss, ref, torch.float32)  # the loss itself is accumulated and returned in fp32
    close(dz, dz_ref, dtype)
    close(dw, dw_ref, torch.float32)


def test_invalid_pairs_take_no_part(device):
    groups, w, z = inputs(8, 4, 3, torch.float32, device)
    labels = torch.randint(0, 3, (8,)).to(device)
    valid = torch.ones(w.shape, dtype=torch.bool, device=device)
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


def test_auto_dispatch_uses_triton_for_cuda_tensors_only(device):
    x = torch.zeros(1, device=device)
    assert mk.use_triton(x, "auto") == (device.type == "cuda")
    assert mk.use_triton(x, "triton")  # compiled on CUDA, interpreted on the CPU
    assert not mk.use_triton(x, "torch")


def test_unknown_backend_and_uninterpreted_cpu_are_refused():
    with pytest.raises(ValueError, match="must be auto, triton or torch"):
        mk.use_triton(torch.zeros(1), "cuda")
    if not INTERPRETED and mk.triton is not None:
        with pytest.raises(RuntimeError, match="needs triton and a CUDA tensor"):
            mk.use_triton(torch.zeros(1), "triton")


@pytest.mark.parametrize("space", ["logit", "feature"])
def test_the_trainer_step_gives_the_same_loss_with_either_path(space, device):
    results = {}
    for backend in ("torch", "triton"):
        cfg = load_config(
            None,
            [
                "method.name=iam",
                "model.backbone=test_resnet",
                "method.group_size=4",
                f"method.mixup_space={space}",
                f"method.mixup_backend={backend}",
            ],
        )
        torch.manual_seed(0)
        model = build_model(cfg.model, "iam", num_classes=3, in_chans=1).to(device)
        batch = {key: value.to(device) for key, value in random_batch().items()}
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
