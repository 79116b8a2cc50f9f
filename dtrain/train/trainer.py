"""The training loop: `Trainer(resolve(config)).fit()`, what `dtrain.train.train` runs for
each round.

One epoch streams the train shards and takes a step of the configured method per batch, then
evaluates val with the trained weights and their moving average (model selection,
`dtrain.train.selection`, on the val labels as shipped, noisy like a real user's; the clean
labels beside). At the end (`_finish`): test metrics of the selected, the last and
the averaged weights, the mislabel ranking, curves. The backend (Accelerate or DeepSpeed) is
behind `Engine`; checkpoints behind `CheckpointSaver`; the mislabel scores behind
`ScoreAccumulator`.

Per micro-step the loop issues one small all-reduce, the *header* of the next batch: its valid
count (each rank weighs its loss by its share of the global count, so padding never skews the
mean) and, on log steps, the stop flag, the main rank's "checkpoint due" flag and the metric sums
since the last log. Nothing is read back to the host except on log steps and at epoch ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dtrain import distributed
from dtrain.config import save_config
from dtrain.dataset.format import read_dataset_json, split_urls, training_splits
from dtrain.dataset.loader import ShardLoader, make_loader
from dtrain.errors import ConfigError, NonFiniteLossError
from dtrain.methods.losses import rank_weight, wide
from dtrain.methods.model import build_model
from dtrain.methods.steps import TrainStep, forget_rate, memory_rule
from dtrain.prepare.data_folder import resolve_data_dir
from dtrain.train import report, selection
from dtrain.train.checkpoint import (
    BEST,
    LAST,
    Cadence,
    CheckpointSaver,
    TrainState,
    load_checkpoint,
    selected_weights,
)
from dtrain.train.ema import WeightAverage, horizon_steps
from dtrain.train.engine import Engine, make_engine
from dtrain.train.evaluation import evaluate
from dtrain.train.export import export_best
from dtrain.train.folds import sample_folds
from dtrain.train.label_scores import ScoreAccumulator
from dtrain.train.lr_schedule import lr_factor
from dtrain.train.resolve import ResolvedRun
from dtrain.train.rng import rng_states_of_all_ranks, seed_everything
from dtrain.train.running_sums import STOP, MetricSums, NonFiniteCounter, epoch_metrics
from dtrain.train.sample_memory import SampleMemory
from dtrain.train.step_guard import StepGuard


@dataclass
class StepInfo:
    """What `on_step` sees after each optimiser step; `metrics` only on log steps."""

    step: int
    epoch: float
    metrics: dict[str, float] | None


EpochHook = Callable[[dict, Path], None]
StepHook = Callable[[StepInfo], None]


class Trainer:
    """`on_epoch_end(record, last_checkpoint)` after each epoch (a Ray Tune trial reports from
    it), `on_step(StepInfo)` after each optimiser step; `request_stop()` (a preemption signal),
    a set `stop` event or the appearance of `stop_file` (a SLURM job's warning) makes `fit`
    checkpoint and return at the next log step (`train.log_every`), on every rank at the same
    step. Label clean-up rounds (`dtrain.train.rounds`) hand over an `engine` to share, the
    training labels they corrected (`relabel`, by sample key) and the weights to start from
    (`init_weights`, a checkpoint); a cross-fitted round's fold run hides the labels of fold k
    of K (`hidden_fold=(k, K)`, dtrain.train.folds) and scores only those samples."""

    def __init__(
        self,
        run: ResolvedRun,
        on_epoch_end: EpochHook | None = None,
        on_step: StepHook | None = None,
        resume: bool = False,
        stop: threading.Event | None = None,
        stop_file: Path | None = None,
        engine: Engine | None = None,
        relabel: dict[str, int] | None = None,
        init_weights: Path | None = None,
        hidden_fold: tuple[int, int] | None = None,
    ) -> None:
        self.config = config = run.config
        self.on_epoch_end, self.on_step = on_epoch_end, on_step
        self.resume = resume
        # requested on this rank: a signal, a callback, or the job's stop file appearing
        self._stop = stop or threading.Event()
        self._stop_file = stop_file
        self._stopping = False  # agreed by every rank: only this ends the loop
        self._owns_engine = engine is None
        self.engine = engine or make_engine(run)
        self.relabel, self.init_weights = relabel, init_weights
        self.hidden_fold = hidden_fold
        self.run_dir = config.run_path

    def request_stop(self) -> None:
        """Safe from a signal handler: checkpoint and return at the next log step."""
        self._stop.set()

    def _stop_requested(self) -> bool:
        if not self._stop.is_set() and self._stop_file is not None and self._stop_file.exists():
            self._stop.set()
        return self._stop.is_set()

    @property
    def is_main(self) -> bool:
        return self.engine.is_main

    @property
    def net(self) -> torch.nn.Module:
        """The network as tested and saved, unwrapped from DDP or DeepSpeed."""
        return self.engine.unwrap().net

    def loader(self, split: str, train: bool) -> ShardLoader:
        """This rank's loader over one split of the run's dataset."""
        d = self.config.data
        return make_loader(
            split_urls(self.data_dir, split),
            train=train,
            batch_size=d.batch_size,
            image_size=d.image_size,
            num_workers=d.num_workers,
            rank=self.engine.process_index,
            world_size=self.engine.num_processes,
            seed=self.config.train.seed,
            shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled and train,
            samples_per_epoch=d.samples_per_epoch if train else None,
            strict=d.strict,
            pin_memory=self.engine.device.type == "cuda",
            meta=self.meta,  # shards indexed elsewhere are listed only there
            relabel=self.relabel if train else None,
            clean_labels=train and d.train_labels == "clean",
        )

    def build(self) -> None:
        """Data, model and optimiser; no files written."""
        cfg = self.config
        # one stream per rank (DDP and DeepSpeed broadcast rank 0's initial weights)
        seed_everything(cfg.train.seed + self.engine.process_index)
        self.data_dir = resolve_data_dir(cfg.data.path, cfg.train.progress)
        self.meta = read_dataset_json(str(self.data_dir))
        self.classes = self.meta["classes"]
        if cfg.data.train_labels == "clean" and not report.knows_clean_labels(self.meta):
            raise ConfigError(
                f"data.train_labels=clean needs clean labels kept beside the given ones "
                f"(dtrain prepare --noise ... or --clean-label-column); {self.data_dir} has none"
            )
        splits = training_splits(self.data_dir, self.meta)  # val and test may be missing
        self.split_notes = report.no_split_notes(self.data_dir, self.run_dir, splits)
        self.train_loader = self.loader("train", train=True)
        self.val_loader, self.test_loader = (
            self.loader(s, train=False) if s in splits else None for s in ("val", "test")
        )
        net = build_model(
            cfg.model, cfg.method.name, len(self.classes), self.meta["images"]["channels"]
        )
        if self.init_weights is not None:  # before prepare: DeepSpeed copies or splits them
            net.load_state_dict(load_checkpoint(self.init_weights)["model"])
        if cfg.model.sync_batchnorm and self.engine.num_processes > 1:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = TrainStep(net, cfg.method, len(self.classes), forget_rate(cfg, self.meta))
        self.engine.prepare(model)
        t = cfg.train
        # ZeRO-3 partitions the weights over the ranks: no rank could average them whole
        average = t.ema_epochs > 0 and self.engine.holds_full_weights
        steps_per_epoch = -(-len(self.train_loader) // t.grad_accum_steps)
        horizon = horizon_steps(t.ema_epochs, steps_per_epoch)
        self.ema = WeightAverage(self.net, horizon) if average else None
        self.guard = StepGuard(self.net, self.ema)  # what a skipped step must leave as it was
        self.rule = selection.effective_rule(
            t.select, self.ema is not None, self.val_loader is not None, t.epochs, t.select_window
        )
        self.state = TrainState()
        self.scores = ScoreAccumulator()
        rule = memory_rule(cfg.method, len(self.classes))
        self.memory = SampleMemory(rule) if rule is not None else None
        self.saver = CheckpointSaver(self.run_dir, self.engine)

    def _open_run(self) -> None:
        """Start the run or restore it (CheckpointSaver.resume_point); save the resolved config;
        open the logs, cut back to the checkpoint (a crash may have logged past it)."""
        ckpt = self.saver.resume_point(self.resume, self.config.identity())
        if ckpt is not None:
            self.saver.restore(ckpt)
            self.state.load_state_dict(ckpt["state"])
            self.state.nonfinite_in_a_row = 0  # a resume is a fresh chance
            self.scores.load_state_dict(ckpt["scores"])
            if self.memory is not None:
                self.memory.load_state_dict(ckpt["memory"])
            if self.ema is not None:  # a checkpoint without one: average from here on
                self.ema.load_state_dict(ckpt.get("ema") or self.net.state_dict())
        t = self.config.train
        self.cadence = Cadence(
            t.checkpoint_every_steps, t.checkpoint_every_minutes, self.state.step
        )
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            self.log = report.RunLog(self.run_dir, self.state, self.config, self.saver)

    def _payload(self) -> dict:
        return {
            "model": self.engine.full_state_dict(),
            "optimizer": self.engine.optimizer_state(),
            "rng": rng_states_of_all_ranks(),
            "state": self.state.state_dict(),
            "scores": self.scores.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "selected_weights": selection.RULES[self.rule].weights,
            "config": self.config.to_dict(),
            "classes": self.classes,
            "channels": self.meta["images"]["channels"],
        }

    def _save(self, best: bool = False) -> Path:
        self.scores.merge()
        if self.memory is not None:
            self.memory.merge()
        # mid-epoch: the epoch's sums so far, so that a resumed epoch's record covers all of it
        self.state.epoch_sums = self._epoch_sums.saved() if self.state.batch else {}
        path = self.saver.save(self._payload, self.state.step, best)
        self.cadence.saved(self.state.step)
        return path

    def evaluate(self, loader: ShardLoader, net: torch.nn.Module | None = None) -> dict[str, float]:
        """Metrics of `net` (default: the trained network) on a split (collective: every rank
        scores its share)."""
        self.engine.sync_buffers(net)
        return evaluate(self.engine, loader, net)

    # -- training ------------------------------------------------------------------------------

    def _header(self, batch: dict | None, sums: MetricSums | None) -> torch.Tensor:
        """The all-reduced header of the next batch: [global valid count] and, on log steps,
        [stop flag, checkpoint due, metric sums...] (see the module docstring)."""
        device = self.engine.device
        count = batch["valid"].sum() if batch is not None else torch.zeros((), device=device)
        parts = [count.to(torch.float64).reshape(1)]
        if sums is not None:
            due = self.is_main and self.cadence.due_by_time()
            flags = [float(self._stop_requested()), float(due)]
            parts += [torch.tensor(flags, dtype=torch.float64, device=device), sums.vector()]
        return distributed.sum_over_ranks(torch.cat(parts))

    def _train_epoch(self) -> dict[str, float]:
        cfg, state, engine = self.config, self.state, self.engine
        loader = self.train_loader
        loader.set_epoch(state.epoch, start_batch=state.batch)
        num_batches, accum = len(loader), cfg.train.grad_accum_steps
        world = engine.num_processes
        scoring = state.epoch >= cfg.train.epochs - cfg.method.score_epochs
        epoch_sums, window = MetricSums(engine.device), MetricSums(engine.device)
        before = state.epoch_sums.get("valid", 0.0)  # samples trained on before a resume
        epoch_sums.resume(state.epoch_sums, self.is_main)
        self._epoch_sums = epoch_sums
        nonfinite = NonFiniteCounter(engine.device, state)
        started, first_batch = time.perf_counter(), state.batch
        bar = report.progress(
            num_batches,
            f"epoch {state.epoch + 1}/{cfg.train.epochs}",
            enabled=cfg.train.progress and self.is_main,
            initial=state.batch,
        )
        batches = iter(loader)
        batch = self.engine.to_device(next(batches, None))
        header = self._header(batch, None)
        while batch is not None:
            index = state.batch
            boundary = (index + 1) % accum == 0 or index + 1 == num_batches
            micro_steps = min(accum, num_batches - index + index % accum)  # in this window
            valid = batch["valid"]
            if index % accum == 0:
                self.guard.open()
            # this rank's share of the global mean, averaged over the window's micro-steps
            weight = rank_weight(valid, header[0], world) / micro_steps
            memory = (
                None if self.memory is None else self.memory.lookup(batch["key"], engine.device)
            )
            labels, scored = batch["label"], valid
            if self.hidden_fold is not None:
                fold, folds = self.hidden_fold
                hidden = sample_folds(batch["group"], batch["key"], folds) == fold
                labels, scored = torch.where(hidden, -1, labels), valid & hidden
            with engine.accumulating(boundary):
                with engine.autocast():
                    out = engine.model(
                        batch["view1"], batch["view2"], labels, valid, state.epoch, memory
                    )
                engine.backward(out["loss"] * weight)
            if boundary:
                progress = state.epoch + index / num_batches
                lr = cfg.optim.lr * lr_factor(progress, cfg.optim.warmup_epochs, cfg.train.epochs)
                taken = engine.step(lr)
                nonfinite.update(taken)
                state.step += 1
                self.guard.settle(taken, state.step)
            for sums in (epoch_sums, window):
                sums.add_step(out, batch)
            state.note_skipped(batch.get("skipped", []))
            if self.memory is not None:
                self.memory.add(batch["key"], valid, out["memory"])
            if scoring:
                sample_loss = out["sample_loss"]
                if self.hidden_fold is not None:  # the step saw no label for these: score them
                    sample_loss = F.cross_entropy(
                        wide(out["logits"]), batch["label"], reduction="none"
                    )
                self.scores.add(
                    batch["key"],
                    scored,
                    batch["label"],
                    batch["clean_label"],
                    sample_loss,
                    out["logits"].argmax(-1),
                    out["attention"],
                )
            state.batch = index + 1
            log_now = boundary and state.step % cfg.train.log_every == 0
            batch = self.engine.to_device(next(batches, None))
            header = self._header(batch, window if log_now else None)
            bar.update(1)
            metrics = None
            if log_now:
                metrics, self._stopping, due = self._log_step(
                    header, window, nonfinite, started, first_batch
                )
                bar.set_postfix(
                    loss=f"{metrics['loss']:.3f}", img_s=f"{metrics['images_per_s']:.0f}"
                )
                if due and not self._stopping and state.batch < num_batches:
                    self._save()  # mid-epoch, with the loader position: bounded loss
            if boundary and self.on_step is not None:
                self.on_step(StepInfo(state.step, state.epoch + state.batch / num_batches, metrics))
            steps_here = state.step - self._first_step
            if boundary and cfg.train.stop_after_steps and steps_here >= cfg.train.stop_after_steps:
                self._stopping = True  # the same step on every rank: no agreement needed
            if self._stopping:
                break
        bar.close()
        nonfinite.read()
        # a stop requested after the last log step is agreed here, with the epoch's sums
        epoch_sums.put(STOP, float(self._stop_requested()))
        totals = epoch_sums.reduce()
        self._stopping = self._stopping or totals.pop(STOP) > 0
        if not self._stopping or state.batch == num_batches:  # else the epoch goes on later
            state.corrupt_samples += int(totals.get("corrupt", 0.0))
        return epoch_metrics(totals, time.perf_counter() - started, before)

    def _log_step(
        self,
        header: torch.Tensor,
        window: MetricSums,
        nonfinite: NonFiniteCounter,
        started: float,
        first_batch: int,
    ) -> tuple[dict[str, float], bool, bool]:
        """The one read-back of a log step: the header's sums, the stop and checkpoint flags,
        the non-finite counters and the pending mislabel scores."""
        state, cfg = self.state, self.config
        values = header.tolist()
        stop, due = values[1] > 0, values[2] > 0 or self.cadence.due_by_steps(state.step)
        totals = dict(zip(window.names(), values[3:], strict=True))
        window.clear()
        nonfinite.read()
        self.scores.flush()
        seen = max(1.0, totals["valid"])
        done = (state.batch - first_batch) * cfg.data.batch_size * self.engine.num_processes
        record = {
            "kind": "step",
            "step": state.step,
            "epoch": state.epoch + state.batch / len(self.train_loader),
            "loss": totals["loss"] / seen,
            "lr": float(self.engine.optimizer.param_groups[0]["lr"]),
            "images_per_s": done / (time.perf_counter() - started),
            "skipped_steps": state.skipped_steps,
        }
        if self.is_main:
            self.log.write(record)
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            self._save()
            raise NonFiniteLossError(
                f"the gradients were not finite for {state.nonfinite_in_a_row} steps in a row "
                f"(epoch {state.epoch + 1}, step {state.step}); the weights before them are in "
                f"{self.saver.last}. Lower optim.lr or raise optim.warmup_epochs, then --resume"
            )
        return record, stop, due

    def fit(self) -> dict:
        """Train (or continue), then write the report; returns the summary dict. A rank whose
        process dies ends the run on every other rank at once, with an error naming it."""
        advice = f"restart the whole run with --resume (from {self.run_dir / LAST})"
        with distributed.naming_lost_ranks(advice):
            return self._fit()

    def _fit(self) -> dict:
        self.build()
        self._open_run()
        cfg, state = self.config, self.state
        self._first_step = state.step
        if self.is_main:
            print(self._banner())
        while state.epoch < cfg.train.epochs:
            train_metrics = self._train_epoch()
            if self._stopping and state.batch < len(self.train_loader):
                self._save()
                if self.is_main:
                    print(
                        f"stopped after batch {state.batch} of {len(self.train_loader)} in "
                        f"epoch {state.epoch + 1}; checkpoint {self.saver.last}"
                    )
                return self._close({"stopped": True, "epoch": state.epoch, "batch": state.batch})
            if self.memory is not None:
                self.memory.end_epoch()
            val = self.evaluate(self.val_loader) if self.val_loader is not None else {}
            if val and self.ema is not None:
                val |= {
                    f"ema_{k}": v for k, v in self.evaluate(self.val_loader, self.ema.net).items()
                }
            record = {
                "kind": "epoch",
                "epoch": state.epoch + 1,
                **train_metrics,
                **{f"val_{k}": v for k, v in val.items()},
                "skipped_steps": state.skipped_steps,
                "corrupt_samples": state.corrupt_samples,
                **({"ema_decay": self.ema.decay_at(state.step)} if self.ema is not None else {}),
            }
            state.history.append(record)
            state.epoch += 1
            state.batch = 0
            value = selection.score(self.rule, state.history, cfg.train.select_window)
            improved = selection.improves(self.rule, value, state.best_val)
            state.best_val = value if improved else state.best_val
            path = self._save(best=improved)
            if self.is_main:
                self.log.write(record)
                print(report.epoch_line(record, report.knows_clean_labels(self.meta)))
            if self.on_epoch_end is not None:
                self.on_epoch_end(record, path)
            if self._stopping and state.epoch < cfg.train.epochs:  # else only the test is left
                return self._close({"stopped": True, "epoch": state.epoch, "batch": 0})
        return self._close(self._finish())

    def _banner(self) -> str:
        """What a run is about to do: method, data, processes, engine, loader, missing splits."""
        engine = self.engine
        lines = [
            f"run {self.run_dir}: {self.config.method.name} on {self.data_dir}, "
            f"{engine.num_processes} process(es) on {engine.device}, {engine.precision}, "
            f"{type(engine).__name__}",
            *(f"engine: {note}" for note in engine.notes),
            f"train: {self.train_loader.describe()}",
            *self.split_notes.values(),
        ]
        if self.relabel:
            lines.append(f"train: {len(self.relabel)} label(s) corrected by earlier rounds")
        return "\n".join(lines)

    def _finish(self) -> dict:
        """The end of a run: the test split scored with the selected weights (best.pt), the last
        ones and their moving average (collective); then, on the main rank, `model.safetensors`
        and the report with what each selection rule would have picked. Returns the summary."""
        test, state, cfg = self.test_loader, self.state, self.config
        test_last = self.evaluate(test) if test is not None else None
        has_ema = test is not None and self.ema is not None
        test_ema = self.evaluate(test, self.ema.net) if has_ema else None
        test_best = None  # under ZeRO-3 `dtrain eval RUN_DIR` scores best.pt
        if test is not None and self.engine.holds_full_weights:
            self.net.load_state_dict(selected_weights(load_checkpoint(self.run_dir / BEST)))
            test_best = self.evaluate(test)
        if not self.is_main:
            return {}
        rule = self.rule
        chosen = selection.picks(rule, state.history, cfg.train.select_window)
        picked = {
            "rule": rule,
            "asked": cfg.train.select,  # differs where the run could not apply it (no val, no EMA)
            "describe": selection.RULES[rule].describe,
            "epoch": chosen,
            "weights": selection.RULES[rule].weights,
            "candidates": selection.candidates(
                state.history, cfg.train.select_window, self.ema is not None
            ),
            # the decay the weight average had reached at the last step (train.ema_epochs)
            "ema_decay": self.ema.decay_at(state.step) if self.ema is not None else None,
        }
        clean = report.knows_clean_labels(self.meta)
        export_best(self.run_dir, self.meta["images"]["channels"])  # model.safetensors
        summary = report.write_run_report(
            self.run_dir,
            cfg,
            state.history,
            self.scores.table,
            test_best=test_best,
            test_last=test_last,
            test_ema=test_ema,
            selection=picked,
            clean_known=clean,
            test_skipped=self.split_notes.get("test"),
            manifest=self.data_dir / "manifest.parquet",
            classes=self.classes,
            skipped=(state.corrupt_samples, state.skipped),
        )
        self.log.finish(summary, report.selection_table(picked, clean))
        return summary

    def _close(self, result: dict) -> dict:
        if self.is_main:
            self.log.close()
        if self._owns_engine:
            self.engine.close()
        return result
