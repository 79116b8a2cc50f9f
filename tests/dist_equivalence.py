"""A few optimiser steps of dtrain's TrainStep on one fixed global batch, in however many
processes torchrun started (or one): each rank takes its slice of the batch. Rank 0 writes the
final weights. test_distributed.py compares 1 process with 2.

It runs in float64: in float32, three steps at lr 0.1 amplify the rounding differences of a
different summation order to ~1e-3, which would hide a real error; in float64 the two agree to
~1e-13 when the gradients are the same function, and are far apart when they are not (local
instead of global contrastive negatives gives ~0.3)."""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from dtrain.config import load_config
from dtrain.train.model import build_model
from dtrain.train.steps import TrainStep

if __name__ == "__main__":
    method, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    cfg = load_config(
        None,
        [
            f"method.name={method}",
            "model.backbone=test_resnet",
            "method.group_size=4",
            "method.lambda_iam=0",
        ],
    )
    torch.manual_seed(0)
    net = build_model(cfg.model, method, num_classes=3, in_chans=1)
    # batch-norm statistics are per rank under DDP by design (SyncBatchNorm needs CUDA); with
    # them frozen, one process and two must agree exactly on the rest
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    net = net.double()
    model = TrainStep(net, cfg.method, num_classes=3, forget_rate=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = torch.Generator().manual_seed(123)
    batch = 16
    view1 = torch.randn(batch, 1, 32, 32, generator=data, dtype=torch.float64)
    view2 = torch.randn(batch, 1, 32, 32, generator=data, dtype=torch.float64)
    label = torch.randint(0, 3, (batch,), generator=data)
    rank, world = accelerator.process_index, accelerator.num_processes
    part = slice(rank * batch // world, (rank + 1) * batch // world)
    valid = torch.ones(batch // world, dtype=torch.bool)
    for _ in range(steps):
        output = model(view1[part], view2[part], label[part], valid, 1)
        accelerator.backward(output["loss"])
        optimizer.step()
        optimizer.zero_grad()
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).net.state_dict(), out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
