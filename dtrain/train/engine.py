"""The backends behind the training loop: one interface, an Accelerate (DDP) and a DeepSpeed
implementation, so that the loop itself never asks which one it runs on.

Both skip the whole optimiser step of an accumulation window in which any gradient is not
finite, on every rank alike: weights and optimiser state stay as they were (the trainer's
`StepGuard` keeps the batch-norm statistics and the weight average). The Accelerate engine
decides on the device, without reading anything back: after DDP's all-reduce every rank holds
the same gradients and so the same gradient norm, and the fused optimisers take a `found_inf`
tensor (as under torch's GradScaler) that turns their step into a no-op. DeepSpeed reads its own
values back every step anyway; its engine checks the loss on the host."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from datetime import timedelta

import torch
from torch import nn

from dtrain import distributed
from dtrain.config import Config, OptimConfig
from dtrain.errors import ConfigError, DistributedError
from dtrain.train.deepspeed_config import ResolvedDeepSpeed
from dtrain.train.resolve import ResolvedRun


def build_optimizer(config: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """optim.* as a fused torch optimiser: one kernel per step, and a `found_inf` input that
    skips the step on the device."""
    if config.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=True,
            fused=True,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)


class Engine(ABC):
    """Process group, device, wrapping, backward and optimiser step, weights and shards."""

    device: torch.device
    process_index: int
    num_processes: int
    model: nn.Module  # the wrapped TrainStep: call it for a training forward pass
    optimizer: torch.optim.Optimizer

    def __init__(self, config: Config, precision: str) -> None:
        self.config = config
        self.precision = precision
        self.accum = config.train.grad_accum_steps
        self.notes: list[str] = []  # what the engine decided, for the run's log

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @abstractmethod
    def prepare(self, model: nn.Module) -> None:
        """Wrap the TrainStep module and build its optimiser (optim.*, or DeepSpeed's own)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @abstractmethod
    def accumulating(self, boundary: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are exchanged only on
        the accumulation boundary."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-step's loss, as given: the loop has already divided it by the
        micro-steps of its accumulation window."""

    @abstractmethod
    def step(self, lr: float) -> torch.Tensor:
        """The optimiser step at an accumulation boundary, with `lr` unless the backend owns the
        schedule; returns a device bool tensor: False where gradients were not finite."""

    @abstractmethod
    def unwrap(self) -> nn.Module:
        """The TrainStep module without DDP / DeepSpeed around it."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The network's full weights; collective under ZeRO-3 (every rank must call it)."""

    @property
    def holds_full_weights(self) -> bool:
        """Whether `unwrap().net` holds every weight on every rank (not so under ZeRO-3)."""
        return True

    def optimizer_state(self) -> dict | None:
        """For last.pt; None where the backend keeps it in its own shards."""
        return self.optimizer.state_dict()

    def save_shards(self, folder: str, tag: str) -> bool:
        """Collective; writes the backend's own sharded state. False: it keeps none."""
        return False

    def load(self, weights: dict, optimizer: dict | None, folder: str, tag: str | None) -> None:
        """Restore what `full_state_dict`/`optimizer_state`/`save_shards` saved."""
        self.unwrap().net.load_state_dict(weights)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    def sync_buffers(self, net: nn.Module | None = None) -> None:
        """Rank 0's buffers (batch-norm running statistics) of `net` (default: the trained
        network) to every rank, before evaluation: once an epoch instead of DDP's broadcast
        before every forward pass."""
        if self.num_processes > 1:
            for buffer in (net or self.unwrap().net).buffers():
                torch.distributed.broadcast(buffer, src=0)

    def speed_up(self, model: nn.Module) -> None:
        """train.channels_last and train.compile, in place: parameter names (and so
        checkpoints) stay as they are, and DDP wraps the result. DeepSpeed compiles its own
        engine instead (its ZeRO hooks need to know) and refuses channels-last."""
        if self.config.train.channels_last:
            model.to(memory_format=torch.channels_last)
        self.compile_in_place(model)

    def compile_in_place(self, module: nn.Module) -> None:
        """`module.compile()` with train.compile's backend (true: inductor); nothing if off."""
        backend = self.config.train.compile
        if not backend:
            return
        from torch._inductor import config as inductor

        # the eager random stream (mixup groups, lambda): the same numbers, exact resumes
        inductor.fallback_random = True
        module.compile(backend="inductor" if backend is True else backend)

    def to_device(self, batch: dict | None) -> dict | None:
        """A loader's batch on this rank's device (its lists, e.g. keys, as they are), images
        channels-last where the weights are."""
        if batch is None:
            return None
        return {k: self._moved(v) for k, v in batch.items()}

    def _moved(self, value: object) -> object:
        if not torch.is_tensor(value):
            return value
        nhwc = self.config.train.channels_last and value.dim() == 4
        layout = torch.channels_last if nhwc else torch.preserve_format
        return value.to(self.device, non_blocking=True, memory_format=layout)

    def barrier(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Every rank leaves together: a rank that exits alone aborts the others."""
        self.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class AccelerateEngine(Engine):
    """DDP through Accelerate, on CPUs (gloo) and GPUs (nccl)."""

    def __init__(self, config: Config, precision: str) -> None:
        super().__init__(config, precision)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        try:
            self.accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),
                mixed_precision="no",  # autocast is ours (Engine.autocast)
                kwargs_handlers=[
                    # methods leave parts unused (the projector for CE, attention in warm-up)
                    DistributedDataParallelKwargs(
                        find_unused_parameters=True, broadcast_buffers=False
                    ),
                    InitProcessGroupKwargs(timeout=timedelta(seconds=config.train.dist_timeout_s)),
                ],
            )
        except (torch.distributed.DistError, TimeoutError) as err:
            raise _join_error(err) from err
        self.device = self.accelerator.device
        self.process_index = self.accelerator.process_index
        self.num_processes = self.accelerator.num_processes

    def prepare(self, model: nn.Module) -> None:
        self.accelerator.free_memory()  # a clean-up round's new model: drop the last one
        self.speed_up(model)
        self.model = self.accelerator.prepare(model)
        self._params = [p for p in self.unwrap().parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.config.optim, self._params)
        if self.config.optim.name == "sgd":
            # a fused SGD step skipped by found_inf leaves a new momentum buffer uninitialised;
            # zeros are exactly what the first real step expects (dampening 0)
            for p in self._params:
                self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)

    def accumulating(self, boundary: bool) -> contextlib.AbstractContextManager:
        if boundary or self.num_processes == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float) -> torch.Tensor:
        clip = self.config.optim.grad_clip
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None
        if norm is None:
            finite = torch.ones((), dtype=torch.bool, device=self.device)
        else:
            finite = torch.isfinite(norm)
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(self._params, clip, norm, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # the fused step is a no-op where found_inf is set: no host read-back
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def unwrap(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.unwrap().net.state_dict()

    def close(self) -> None:
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


class DeepSpeedEngine(Engine):
    """deepspeed.initialize with a ZeRO config as users write them; works under torchrun, srun,
    `accelerate launch` and the `deepspeed` launcher, on GPUs (nccl) and CPUs (gloo)."""

    def __init__(self, config: Config, precision: str, resolved: ResolvedDeepSpeed) -> None:
        super().__init__(config, precision)
        import deepspeed  # here: a refused file (dtrain.train.resolve) costs no DeepSpeed import

        self.resolved = resolved
        self.notes = resolved.notes
        cuda = torch.cuda.is_available()
        distributed.env_for_one_process()  # ZeRO (any stage) runs in one process too
        try:
            deepspeed.init_distributed(
                dist_backend="nccl" if cuda else "gloo",
                timeout=timedelta(seconds=config.train.dist_timeout_s),
            )
        except (torch.distributed.DistError, TimeoutError) as err:
            raise _join_error(err) from err
        self.process_index, self.num_processes = distributed.world()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)

    def prepare(self, model: nn.Module) -> None:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=None
            if self.resolved.builds_optimizer
            else build_optimizer(self.config.optim, params),
            model_parameters=params,
            config=self.resolved.config,
        )
        self.compile_in_place(self.model)
        self._params = params
        self._window_finite = True  # every micro-step of the accumulation window so far

    def accumulating(self, boundary: bool) -> contextlib.AbstractContextManager:
        self.model.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """A non-finite loss on any rank skips the window's step on every rank: without
        accumulation nothing runs; inside a window its backward becomes one of a NaN loss, so
        that DeepSpeed's own overflow check skips the step (weights, optimiser state, schedule)
        and drops the gradients the window's other micro-steps accumulated."""
        finite = not distributed.any_rank(not bool(torch.isfinite(loss)), self.device)
        self._window_finite = self._window_finite and finite
        if finite:
            self.model.backward(loss, scale_wrt_gas=False)
        elif self.accum > 1:
            nan = sum(p.sum() for p in self._params) * float("nan")
            self.model.backward(nan, scale_wrt_gas=False)

    def step(self, lr: float) -> torch.Tensor:
        if not self.resolved.builds_scheduler:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        finite, self._window_finite = self._window_finite, True
        if finite or self.accum > 1:
            self.model.step()  # clips (gradient_clipping) and zeroes the gradients itself
        if not finite and self.accum > 1 and self.model.was_step_applied():
            raise DistributedError(
                "DeepSpeed applied an optimiser step with non-finite gradients: this DeepSpeed "
                "config has no overflow check; use ZeRO stage 1-3 with bf16.check_grad_overflow "
                "left true"
            )
        return torch.tensor(finite, device=self.device)

    def unwrap(self) -> nn.Module:
        return self.model.module

    @property
    def holds_full_weights(self) -> bool:
        return self.resolved.stage < 3

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.resolved.stage == 3:
            full = self.model._zero3_consolidated_16bit_state_dict() or {}
            return {k.removeprefix("net."): v for k, v in full.items()}
        return self.unwrap().net.state_dict()

    def optimizer_state(self) -> dict | None:
        return None  # sharded: it lives in run_dir/deepspeed/<tag>

    def save_shards(self, folder: str, tag: str) -> bool:
        self.model.save_checkpoint(folder, tag=tag)
        return True

    def load(self, weights: dict, optimizer: dict | None, folder: str, tag: str | None) -> None:
        from dtrain.errors import RunFolderError

        loaded, _ = self.model.load_checkpoint(folder, tag=tag)
        if loaded is None:
            raise RunFolderError(
                f"DeepSpeed shards {tag} are missing under {folder}; the run cannot be "
                "resumed exactly"
            )


def _join_error(err: BaseException) -> DistributedError:
    return DistributedError(
        f"rank {os.environ.get('RANK', '?')} could not join the process group at "
        f"{distributed.rendezvous()} ({err}); check that all ranks were started and "
        "that every node can reach that address"
    )


def make_engine(run: ResolvedRun) -> Engine:
    """DeepSpeed when the run resolved a DeepSpeed config, else Accelerate; then the preflight."""
    config = run.config
    distributed.silence_understood_warnings()
    engine = (
        DeepSpeedEngine(config, run.precision, run.deepspeed)
        if run.deepspeed is not None
        else AccelerateEngine(config, run.precision)
    )
    distributed.preflight(engine.device)
    if config.model.sync_batchnorm and engine.device.type == "cpu" and engine.num_processes > 1:
        raise ConfigError(
            "model.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has no CPU path); "
            "set it to false"
        )
    return engine
