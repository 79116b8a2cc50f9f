"""The training loop, on Accelerate so that multi-process launches run it unchanged.

One epoch: stream the train shards, take a step of the configured method, then evaluate on val
(model selection on the val labels as shipped, noisy like a real user's; clean-label numbers
beside). At the end: test metrics of the best and the last model, the mislabel ranking, curves.
Checkpoints (`last.pt`, `best.pt`) hold everything needed to continue exactly: model, optimiser,
RNG states, the data position, the score accumulators and the config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    gather_object,
    set_seed,
)

from dtrain import distributed
from dtrain.config import Config, ConfigError, config_from_dict, save_config
from dtrain.train import checkpoint, report
from dtrain.train.data import ShardLoader, make_loader, read_dataset_json, split_urls
from dtrain.train.ds_config import resolve_deepspeed_config
from dtrain.train.metrics import classification_metrics
from dtrain.train.model import build_model
from dtrain.train.steps import TrainStep

EpochHook = Callable[[dict, Path], None]


def resolve_data_dir(config: Config, accelerator: Accelerator) -> Path:
    """The configured dataset folder, or the embedded Br35H set (prepared by rank 0 if missing)."""
    if config.data.path:
        path = Path(config.data.path)
        if not (path / "dataset.json").is_file():
            raise FileNotFoundError(
                f"data.path={path} holds no dataset.json; create it with `dtrain prepare`"
            )
        return path
    from dtrain.prepare import PrepareConfig, default_out, prepare
    from dtrain.prepare.sources import from_embedded

    prep = PrepareConfig(progress=config.train.progress)
    path = default_out(prep, from_embedded())
    if accelerator.is_main_process:
        prepare(prep)  # a no-op when the folder already holds this exact dataset
    accelerator.wait_for_everyone()
    return path


def lr_factor(progress: float, warmup: float, total: float) -> float:
    """Linear warm-up over `warmup` epochs, then cosine to zero at `total` epochs."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    span = max(total - warmup, 1e-8)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / span)))


@dataclass
class TrainState:
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already done
    step: int = 0
    best_val: float = -1.0
    history: list = field(default_factory=list)
    # key -> [attention sum, loss sum, count, is_noisy, label, last prediction]
    scores: dict = field(default_factory=dict)
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    corrupt_samples: int = 0


class Trainer:
    """`Trainer(config).fit()`. `on_epoch_end(metrics, checkpoint_path)` is called after each
    epoch (a Ray Tune trial reports from it), `on_step(step)` after each optimiser step;
    `request_stop()` (e.g. from a SLURM preemption signal) makes `fit` checkpoint and return at
    the next step boundary."""

    def __init__(
        self,
        config: Config,
        on_epoch_end: EpochHook | None = None,
        on_step: Callable[[int], None] | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.on_epoch_end = on_epoch_end
        self.on_step = on_step
        self.resume = resume
        self._stop = threading.Event()
        config.validate()
        distributed.env_from_slurm()
        cpu = not torch.cuda.is_available()
        precision = config.train.precision
        if precision == "auto":
            precision = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        t = config.train
        self.native_deepspeed = t.backend == "deepspeed"
        self.ds_config = None
        plugin = None
        if t.deepspeed:
            import deepspeed

            world = int(os.environ.get("WORLD_SIZE", "1"))
            self.ds_config = resolve_deepspeed_config(t.deepspeed, config, precision, world)
            # gloo on CPU (DS_ACCELERATOR=cpu), nccl on GPUs; Accelerate then joins this group
            deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
            if not self.native_deepspeed:
                from accelerate.utils import DeepSpeedPlugin

                if cpu:  # Accelerate selects DeepSpeed only with an accelerator device
                    raise ConfigError(
                        "Accelerate runs DeepSpeed only on GPUs; on CPU set "
                        "train.backend=deepspeed to use deepspeed.initialize directly"
                    )

                plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config)
        try:
            self.accelerator = Accelerator(
                cpu=cpu,
                mixed_precision="bf16" if precision == "bf16" else "no",
                deepspeed_plugin=plugin,
                # methods leave parts unused (the projector for CE, attention during warm-up)
                kwargs_handlers=[
                    DistributedDataParallelKwargs(find_unused_parameters=True),
                    InitProcessGroupKwargs(timeout=timedelta(seconds=t.dist_timeout_s)),
                ],
            )
        except (torch.distributed.DistError, TimeoutError) as err:
            raise distributed.DistributedError(
                f"rank {os.environ.get('RANK', '?')} could not join the process group at "
                f"{distributed.rendezvous()} ({err}); check that all ranks were started and "
                "that every node can reach that address"
            ) from err
        distributed.preflight(self.accelerator.device)
        if config.model.sync_batchnorm and cpu and self.accelerator.num_processes > 1:
            raise ConfigError(
                "model.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm has "
                "no CPU path); set it to false"
            )
        run = t.run_dir or f"runs/{config.method.name}_seed{t.seed}"
        self.run_dir = Path(run)

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def loader(self, split: str, train: bool) -> ShardLoader:
        d = self.config.data
        return make_loader(
            split_urls(self.data_dir, split),
            train=train,
            batch_size=d.batch_size,
            image_size=d.image_size,
            num_workers=d.num_workers,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            seed=self.config.train.seed,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled and train,
            samples_per_epoch=d.samples_per_epoch if train else None,
            strict=d.strict,
        )

    def build(self) -> None:
        """Data, model and optimiser; no files written."""
        cfg = self.config
        set_seed(cfg.train.seed)
        self.data_dir = resolve_data_dir(cfg, self.accelerator)
        self.meta = read_dataset_json(str(self.data_dir))
        self.classes = self.meta["classes"]
        self.train_loader = self.loader("train", train=True)
        self.val_loader = self.loader("val", train=False)
        self.test_loader = self.loader("test", train=False)
        net = build_model(
            cfg.model, cfg.method.name, len(self.classes), self.meta["images"]["channels"]
        )
        if cfg.model.sync_batchnorm and self.accelerator.num_processes > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        rate = cfg.method.coteaching_forget_rate
        self.forget_rate = self.meta["splits"]["train"]["noise_rate"] if rate < 0 else rate
        model = TrainStep(net, cfg.method, len(self.classes), self.forget_rate)
        o = cfg.optim
        if o.name == "sgd":
            optimizer = torch.optim.SGD(
                model.parameters(),
                lr=o.lr,
                momentum=o.momentum,
                weight_decay=o.weight_decay,
                nesterov=True,
            )
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        if self.native_deepspeed:
            import deepspeed

            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.ds_config
            )
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = TrainState()
        self._pending_scores: list[tuple] = []  # this rank's, since the last checkpoint

    @property
    def net(self) -> torch.nn.Module:
        """The network as tested and saved, unwrapped from DDP or DeepSpeed."""
        if self.ds_config is not None:
            return self.model.module.net
        return self.accelerator.unwrap_model(self.model).net

    @property
    def zero3(self) -> bool:
        return self.ds_config is not None and self.ds_config["zero_optimization"]["stage"] == 3

    def _open_run(self) -> None:
        """Refuse to overwrite a run, or restore it; save the resolved config; open logs."""
        cfg = self.config
        last = self.run_dir / "last.pt"
        if last.exists() and not self.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({last}); pass --resume to continue it or "
                "set train.run_dir to start a new one"
            )
        if self.resume:
            self._restore(checkpoint.load(last))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # -- checkpoints ---------------------------------------------------------------------------

    def _net_state(self) -> dict:
        """The network's full weights (collective under ZeRO-3: every rank must call it)."""
        if self.zero3:
            full = self.model._zero3_consolidated_16bit_state_dict() or {}
            return {k.removeprefix("net."): v for k, v in full.items()}
        return self.net.state_dict()

    def _checkpoint(self) -> dict:
        s = self.state
        return {
            "model": self._net_state(),
            # under DeepSpeed the optimizer state is sharded: it lives in run_dir/deepspeed
            "optimizer": None if self.ds_config else self.optimizer.state_dict(),
            "rng": checkpoint.rng_state(),
            "state": {
                "epoch": s.epoch,
                "batch": s.batch,
                "step": s.step,
                "best_val": s.best_val,
                "skipped_steps": s.skipped_steps,
                "nonfinite_in_a_row": s.nonfinite_in_a_row,
                "corrupt_samples": s.corrupt_samples,
            },
            "history": json.dumps(s.history),
            "scores": json.dumps(s.scores),
            "config": self.config.to_dict(),
            "classes": self.classes,
        }

    def _save(self, name: str) -> Path:
        """Collective: every rank calls it; rank 0 writes `name`, DeepSpeed shards its own."""
        path = self.run_dir / name
        self._merge_scores()
        payload = self._checkpoint()
        shards = self.run_dir / "deepspeed"
        tag = f"step{self.state.step}"
        if self.ds_config is not None and name == "last.pt":
            # a new tag each time, named in last.pt: the previous one stays whole until last.pt
            # points past it, so a crash mid-save never leaves a half-written only copy
            self.model.save_checkpoint(str(shards), tag=tag)
            payload["deepspeed_tag"] = tag
        if self.is_main:
            checkpoint.save_atomic(payload, path)
            if self.ds_config is not None and name == "last.pt":
                for old in shards.iterdir():
                    if old.is_dir() and old.name.startswith("step") and old.name != tag:
                        shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return path

    def _restore(self, ckpt: dict) -> None:
        if config_from_dict(ckpt["config"]).identity() != self.config.identity():
            raise ValueError(
                f"{self.run_dir}/last.pt was written with a different config; "
                "resume with the saved config.yaml or start a new run_dir"
            )
        if self.ds_config is not None:
            loaded, _ = self.model.load_checkpoint(
                str(self.run_dir / "deepspeed"), tag=ckpt["deepspeed_tag"]
            )
            if loaded is None:
                raise FileNotFoundError(
                    f"DeepSpeed shards {ckpt['deepspeed_tag']} are missing under "
                    f"{self.run_dir / 'deepspeed'}; the run cannot be resumed exactly"
                )
        else:
            self.net.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.state = TrainState(
            **{**ckpt["state"], "nonfinite_in_a_row": 0},  # a resume is a fresh chance
            history=json.loads(ckpt["history"]),
            scores=json.loads(ckpt["scores"]),
        )

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, loader: ShardLoader) -> dict[str, np.ndarray]:
        """Softmax outputs and labels of every real sample once, gathered over all ranks."""
        was_training = self.model.training
        self.model.eval()
        out: dict[str, list] = {"probs": [], "label": [], "clean_label": []}
        device = self.accelerator.device
        for batch in loader:
            with self.accelerator.autocast():
                logits = self.net(batch["image"].to(device))
            gathered = self.accelerator.gather(
                {
                    "probs": logits.float().softmax(-1),
                    "label": batch["label"].to(device),
                    "clean_label": batch["clean_label"].to(device),
                    "valid": batch["valid"].to(device),
                }
            )
            keep = gathered["valid"]
            for name in out:
                out[name].append(gathered[name][keep].cpu())
        self.model.train(was_training)
        return {name: torch.cat(values).numpy() for name, values in out.items()}

    def evaluate(self, loader: ShardLoader) -> dict[str, float]:
        """Metrics against the labels as shipped (`*`) and against the clean ones (`clean_*`)."""
        p = self.predict(loader)
        shipped = classification_metrics(p["probs"], p["label"])
        clean = classification_metrics(p["probs"], p["clean_label"])
        return {
            **shipped,
            **{f"clean_{k}": v for k, v in clean.items()},
            "samples": len(p["label"]),
        }

    # -- training ------------------------------------------------------------------------------

    def _record_scores(self, out: dict, batch: dict) -> None:
        """Per-sample attention, loss and prediction, for the mislabel ranking."""
        valid = batch["valid"].tolist()
        labels = batch["label"].tolist()
        noisy = (batch["label"] != batch["clean_label"]).tolist()
        attention = out["attention"].float().tolist() if out["attention"] is not None else None
        losses = out["sample_loss"].float().tolist()
        predicted = out["logits"].argmax(-1).tolist()
        records = [
            (
                key,
                attention[i] if attention else float("nan"),
                losses[i],
                noisy[i],
                labels[i],
                predicted[i],
            )
            for i, key in enumerate(batch["key"])
            if valid[i]
        ]
        self._pending_scores += records

    def _merge_scores(self) -> None:
        """Collective, once per checkpoint rather than per step: every rank's new score records
        into `state.scores` on every rank (keys move between ranks from epoch to epoch)."""
        for key, att, loss, is_noisy, label, pred in gather_object(self._pending_scores):
            entry = self.state.scores.setdefault(key, [0.0, 0.0, 0, is_noisy, label, pred])
            entry[0] += att
            entry[1] += loss
            entry[2] += 1
            entry[5] = pred
        self._pending_scores = []

    def _train_epoch(self) -> dict[str, float]:
        cfg, state, acc = self.config, self.state, self.accelerator
        loader = self.train_loader
        loader.set_epoch(state.epoch)
        num_batches = len(loader)
        score_window = state.epoch >= cfg.train.epochs - cfg.method.score_epochs
        totals: dict[str, float] = {}
        seen = correct = stepped = 0
        started = time.perf_counter()
        bar = report.progress(
            num_batches,
            f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            enabled=cfg.train.progress and self.is_main,
            initial=state.batch,
        )
        for index, batch in enumerate(loader):
            if index < state.batch:  # resuming mid-epoch: the loader replays, we skip
                continue
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            progress = state.epoch + index / num_batches
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(
                    progress, cfg.optim.warmup_epochs, cfg.train.epochs
                )
            with acc.autocast():
                out = self.model(
                    batch["view1"], batch["view2"], batch["label"], batch["valid"], state.epoch
                )
            self._optimise(out["loss"])
            state.batch = index + 1
            state.step += 1
            stepped += 1
            state.corrupt_samples += int(batch["corrupt"].sum())
            valid = batch["valid"]
            seen += int(valid.sum())
            correct += int(((out["logits"].argmax(-1) == batch["label"]) & valid).sum())
            loss_value = float(out["loss"].detach())
            for name, value in {"loss": out["loss"].detach(), **out["terms"]}.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            if score_window:
                self._record_scores(out, batch)
            rate = seen / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.0f}")
            if self.is_main and state.step % cfg.train.log_every == 0:
                self._log(
                    {
                        "kind": "step",
                        "step": state.step,
                        "epoch": progress,
                        "loss": loss_value,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": rate,
                    }
                )
            if self.on_step is not None:
                self.on_step(state.step)
            steps_here = state.step - self._first_step
            if cfg.train.stop_after_steps and steps_here >= cfg.train.stop_after_steps:
                self._stop.set()
            if distributed.any_rank(self._stop.is_set(), acc.device):
                self._stop.set()  # a signal seen by one rank stops them all at the same step
                break
        bar.close()
        # over all ranks, and over this invocation's batches (after a resume, fewer than batch)
        names = sorted(totals)
        summed = distributed.all_reduce_sum(
            [totals[k] for k in names] + [stepped, seen, correct], acc.device
        )
        *loss_sums, stepped, seen, correct = summed
        done = max(1.0, stepped)
        return {
            **{f"train_{k}": v / done for k, v in zip(names, loss_sums, strict=True)},
            "train_accuracy": correct / max(1.0, seen),
            "images_per_s": seen / (time.perf_counter() - started),
        }

    def _optimise(self, loss: torch.Tensor) -> None:
        """One optimiser step; a non-finite loss on any rank skips it on every rank."""
        cfg, state, acc = self.config, self.state, self.accelerator
        if distributed.any_rank(not bool(torch.isfinite(loss)), acc.device):
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
            if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                self._save("last.pt")
                raise FloatingPointError(
                    f"the loss was not finite for {state.nonfinite_in_a_row} steps in a row "
                    f"(epoch {state.epoch}, step {state.step}); the weights before them are in "
                    f"{self.run_dir / 'last.pt'}. Lower optim.lr or raise optim.warmup_epochs, "
                    "then --resume"
                )
            if self.ds_config is None:
                self.optimizer.zero_grad(set_to_none=True)
            return
        state.nonfinite_in_a_row = 0
        if self.native_deepspeed:
            self.model.backward(loss)
            self.model.step()  # clips (gradient_clipping) and zeroes the gradients itself
            return
        acc.backward(loss)  # under Accelerate's DeepSpeed plugin this also steps the engine
        if self.ds_config is None and cfg.optim.grad_clip > 0:
            acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if record["kind"] == "step":
            self.tb.add_scalar("train/step_loss", record["loss"], record["step"])
            self.tb.add_scalar("train/lr", record["lr"], record["step"])
        else:
            for name, value in record.items():
                if isinstance(value, float) and math.isfinite(value):
                    self.tb.add_scalar(name.replace("_", "/", 1), value, record["epoch"])

    def fit(self) -> dict:
        """Train (or continue), then write the report; returns the summary dict."""
        self.build()
        self._open_run()
        cfg, state = self.config, self.state
        self._first_step = state.step
        if self.is_main:
            print(
                f"run {self.run_dir}: {cfg.method.name} on {self.data_dir}, "
                f"{self.accelerator.num_processes} process(es) on {self.accelerator.device}, "
                f"{self.precision}"
            )
            print(f"train: {self.train_loader.describe()}")
        while state.epoch < cfg.train.epochs:
            train_metrics = self._train_epoch()
            if self._stop.is_set() and state.batch < len(self.train_loader):
                self._save("last.pt")
                if self.is_main:
                    print(
                        f"stopped at epoch {state.epoch} batch {state.batch}; "
                        f"checkpoint {self.run_dir / 'last.pt'}"
                    )
                return self._close({"stopped": True, "epoch": state.epoch, "batch": state.batch})
            val = self.evaluate(self.val_loader)
            record = {
                "kind": "epoch",
                "epoch": state.epoch + 1,
                **train_metrics,
                **{f"val_{k}": v for k, v in val.items()},
                "skipped_steps": state.skipped_steps,
                "corrupt_samples": state.corrupt_samples,
            }
            state.history.append(record)
            state.epoch += 1
            state.batch = 0
            improved = val["accuracy"] > state.best_val
            if improved:
                state.best_val = val["accuracy"]
            if improved:  # best first: a crash in between must not leave last.pt ahead of it
                self._save("best.pt")
            path = self._save("last.pt")
            if self.is_main:
                self._log(record)
                print(report.epoch_line(record))
            if self.on_epoch_end is not None:
                self.on_epoch_end(record, path)
            if self._stop.is_set():
                return self._close({"stopped": True, "epoch": state.epoch, "batch": 0})
        return self._finish()

    def _finish(self) -> dict:
        test_last = self.evaluate(self.test_loader)
        test_best = None
        if not self.zero3:  # ZeRO-3 shards the weights: `dtrain eval RUN_DIR` scores best.pt
            self.net.load_state_dict(checkpoint.load(self.run_dir / "best.pt")["model"])
            test_best = self.evaluate(self.test_loader)
        summary = {}
        if self.is_main:
            summary = report.write_run_report(
                self.run_dir,
                self.config,
                self.state.history,
                self.state.scores,
                test_best=test_best,
                test_last=test_last,
                manifest=self.data_dir / "manifest.parquet",
                classes=self.classes,
            )
        return self._close(summary)

    def _close(self, result: dict) -> dict:
        """Every rank leaves together: a rank that exits alone aborts the others (SIGABRT)."""
        if self.is_main:
            self.tb.close()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return result
