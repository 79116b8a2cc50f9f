"""A few optimiser steps of dtrain's TrainStep on one fixed global batch, through the real
engine and the trainer's loss weighting, in however many processes torchrun started (or one):
each rank takes its slice of the batch. Rank 0 writes the final weights; test_distributed.py
compares 1 process with 2.

The last `padding` samples of the global batch are padding (valid=False), so with 2 processes
the ranks hold different numbers of real samples: the weighting by the global valid count must
still give the one-process mean. It runs in float64: in float32, three steps at lr 0.1 amplify
the rounding of a different summation order to ~1e-3, which would hide a real error."""

import argparse

import torch

from dtrain.config import load_config
from dtrain.distributed import sum_over_ranks
from dtrain.methods.losses import rank_weight
from dtrain.methods.model import build_model
from dtrain.methods.steps import TrainStep
from dtrain.train.engine import make_engine
from dtrain.train.resolve import resolve

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--padding", type=int, default=0)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--deepspeed", default="", help="a DeepSpeed JSON config")
    args = parser.parse_args()
    method = args.method
    cfg = load_config(
        None,
        [
            f"method.name={method}",
            "model.backbone=test_resnet",
            "method.group_size=4",
            "method.lambda_iam=0",  # groups are drawn per rank: they cannot match one process
            "optim.lr=0.1",
            "optim.weight_decay=0",
            f"train.grad_accum_steps={args.accum}",
            f"train.deepspeed={args.deepspeed}",
            "train.precision=fp32",
        ],
    )
    engine = make_engine(resolve(cfg))
    torch.manual_seed(0)
    net = build_model(cfg.model, method, num_classes=3, in_chans=1)
    # batch-norm statistics are per rank under DDP by design (SyncBatchNorm needs CUDA); with
    # them frozen, one process and two must agree exactly on the rest
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    engine.prepare(TrainStep(net.double(), cfg.method, num_classes=3, forget_rate=0.0))
    data = torch.Generator().manual_seed(123)
    batch = 16
    view1 = torch.randn(batch, 1, 32, 32, generator=data, dtype=torch.float64)
    view2 = torch.randn(batch, 1, 32, 32, generator=data, dtype=torch.float64)
    label = torch.randint(0, 3, (batch,), generator=data)
    valid = torch.arange(batch) < batch - args.padding
    rank, world = engine.process_index, engine.num_processes
    share = batch // world // args.accum
    for _ in range(args.steps):
        for micro in range(args.accum):
            start = (rank * args.accum + micro) * share
            part = slice(start, start + share)
            global_valid = sum_over_ranks(valid[part].sum().double().reshape(1))[0]
            boundary = micro == args.accum - 1
            with engine.accumulating(boundary):
                output = engine.model(view1[part], view2[part], label[part], valid[part], 1)
                weight = rank_weight(valid[part], global_valid, world) / args.accum
                engine.backward(output["loss"] * weight)
            if boundary:
                engine.step(lr=0.1)
    if engine.is_main:
        torch.save(engine.full_state_dict(), args.out)
    engine.close()
