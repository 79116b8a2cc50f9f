#!/usr/bin/env bash
# On an H100/H200 machine: the fused mixup kernel tests on the GPU, then the benchmark.
# Needs torch, triton, timm and pytest (a GPU machine's python3 has them); under 5 minutes.
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/mixup_<gpu>.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'PY'
import torch
from dtrain.train import mixup_kernels as mk
from dtrain.train.losses import make_groups
assert torch.cuda.is_available(), "no GPU"
torch.manual_seed(0)
worst = 0.0
for b, k, d, c in [(256, 8, 2048, 10), (1024, 16, 512, 1000), (4096, 4, 8192, 3), (96, 32, 37, 7)]:
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)]:
        groups = make_groups(b, k, torch.device("cuda"))
        w = torch.rand(b // k, k * (k - 1) // 2, device="cuda", requires_grad=True)
        h = torch.randn(b, d, device="cuda", dtype=dtype, requires_grad=True)
        out = mk.pair_mix(h, groups, w, backend="triton")
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (h, w), g)
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = mk.pair_mix(h64, groups, w64, backend="torch")
        want = torch.autograd.grad(ref, (h64, w64), g.double())
        for x, y in [(out, ref), *zip(got, want)]:
            err = ((x.double() - y).abs().max() / y.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
            assert err < tol, (b, k, d, dtype, err)
        z = torch.randn(b, c, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, c, (b,), device="cuda")
        valid = torch.ones(w.shape, dtype=torch.bool, device="cuda")
        loss = mk.pair_mix_loss(z, groups, w, y, valid, backend="triton")
        dz, dw = torch.autograd.grad(loss, (z, w))
        z64 = z.detach().double().requires_grad_()
        ref = mk.pair_mix_loss(z64, groups, w64, y, valid, backend="torch")
        rdz, rdw = torch.autograd.grad(ref, (z64, w64))
        for x, y2 in [(loss, ref), (dz, rdz), (dw, rdw)]:
            err = ((x.double() - y2).abs().max() / y2.abs().max().clamp_min(1e-12)).item()
            worst = max(worst, err)
            assert err < tol, (b, k, c, dtype, err)
print(f"GPU kernel checks passed on {torch.cuda.get_device_name(0)}; worst relative error {worst:.2e}")
PY
python3 benchmarks/mixup_bench.py --repeats 20
