"""Time and effective bandwidth of the intra-group attention mixup feature op: the fused Triton
kernel vs the torch reference vs torch.compile(reference), bf16, over B x K x D.

    python benchmarks/mixup_bench.py [--batch 256 1024 4096] [--group 2 4 8 16] [--dim 512 2048]

Effective bandwidth = bytes that must move (read H once, write every mixed row once) / time.
On a GPU it also measures the device-to-device copy bandwidth for reference and the logit-space
fused loss (forward + backward) against a ResNet-50 training step at batch 256. Without a GPU the
fused kernel is not timed (Triton's interpreter is a correctness tool, not a speed one). Writes
benchmarks/results/mixup_<device>.json.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import Column, Table, device_name, slug, write_result

from dtrain.methods import mixup_kernels as mk
from dtrain.methods.losses import make_groups


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after a warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str, repeats: int) -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x), repeats)


def resnet50_step_seconds(repeats: int) -> float:
    import timm

    model = timm.create_model("resnet50", num_classes=1000).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(256, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (256,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--group", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--dim", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    name = device_name()
    reference = mk.pair_mix_reference
    compiled = None if args.no_compile else torch.compile(reference)
    rows = []
    table = Table(
        Column("B", 5, "d"),
        Column("K", 3, "d"),
        Column("D", 5, "d"),
        Column("variant", 10),
        Column("ms", 9, ".3f"),
        Column("GB/s", 8, ".1f"),
    )
    table.header()
    for b in args.batch:
        for k in args.group:
            for d in args.dim:
                torch.manual_seed(0)
                h = torch.randn(b, d, device=device, dtype=torch.bfloat16)
                groups = make_groups(b, k, torch.device(device))
                w = torch.rand(b // k, k * (k - 1) // 2, device=device)
                moved = (b * d + (b // k) * k * (k - 1) // 2 * d) * h.element_size()
                call = (h, groups, w)
                variants = {"reference": lambda c=call: reference(*c)}
                if compiled is not None:
                    variants["compiled"] = lambda c=call: compiled(*c)
                if cuda:
                    variants["fused"] = lambda c=call: mk.pair_mix(*c, backend="triton")
                for variant, fn in variants.items():
                    seconds = timed(fn, args.repeats)
                    rows.append(
                        {
                            "B": b,
                            "K": k,
                            "D": d,
                            "variant": variant,
                            "ms": 1e3 * seconds,
                            "GB_s": moved / seconds / 1e9,
                        }
                    )
                    table.row(b, k, d, variant, 1e3 * seconds, moved / seconds / 1e9)
    result = {"device": name, "dtype": "bfloat16", "rows": rows}
    if cuda:
        result["copy_GB_s"] = copy_bandwidth(device, args.repeats) / 1e9
        groups = make_groups(256, 8, torch.device("cuda"))
        z = torch.randn(256, 1000, device="cuda", requires_grad=True)
        w = torch.rand(32, 28, device="cuda", requires_grad=True)
        labels = torch.randint(0, 1000, (256,), device="cuda")
        valid = torch.ones(32, 28, dtype=torch.bool, device="cuda")

        def loss_step():
            mk.pair_mix_loss(z, groups, w, labels, valid, backend="triton").backward()

        result["logit_loss_ms"] = 1e3 * timed(loss_step, args.repeats)
        result["resnet50_step_ms"] = 1e3 * resnet50_step_seconds(5)
        print(
            f"copy bandwidth {result['copy_GB_s']:.0f} GB/s; logit-space loss "
            f"{result['logit_loss_ms']:.3f} ms vs ResNet-50 step {result['resnet50_step_ms']:.1f}"
            " ms at batch 256"
        )
    write_result(f"mixup_{slug(name)}{args.tag}", result)


if __name__ == "__main__":
    main()
