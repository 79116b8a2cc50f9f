"""The end of a run: the test split scored with the selected weights (best.pt), the last ones
and their moving average; `model.safetensors`; the report with what each selection rule would
have picked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dtrain.train import report, selection
from dtrain.train.checkpoint import BEST, load_checkpoint, selected_weights
from dtrain.train.export import export_best

if TYPE_CHECKING:
    from dtrain.train.trainer import Trainer


def finish_run(trainer: Trainer) -> dict:
    """Test metrics (collective), then the report on the main rank; returns the summary."""
    test, state, cfg = trainer.test_loader, trainer.state, trainer.config
    test_last = trainer.evaluate(test) if test is not None else None
    has_ema = test is not None and trainer.ema is not None
    test_ema = trainer.evaluate(test, trainer.ema.net) if has_ema else None
    test_best = None  # under ZeRO-3 `dtrain eval RUN_DIR` scores best.pt
    if test is not None and trainer.engine.holds_full_weights:
        trainer.net.load_state_dict(selected_weights(load_checkpoint(trainer.run_dir / BEST)))
        test_best = trainer.evaluate(test)
    if not trainer.is_main:
        return {}
    rule = trainer.rule
    chosen = selection.picks(rule, state.history, cfg.train.select_window)
    picked = {
        "rule": rule,
        "asked": cfg.train.select,  # differs where the run could not apply it (no val, no EMA)
        "describe": selection.RULES[rule].describe,
        "epoch": chosen,
        "weights": selection.RULES[rule].weights,
        "candidates": selection.candidates(
            state.history, cfg.train.select_window, trainer.ema is not None
        ),
        # the decay the weight average had reached at the last step (train.ema_epochs)
        "ema_decay": trainer.ema.decay_at(state.step) if trainer.ema is not None else None,
    }
    clean = report.knows_clean_labels(trainer.meta)
    export_best(trainer.run_dir, trainer.meta["images"]["channels"])  # model.safetensors
    summary = report.write_run_report(
        trainer.run_dir,
        cfg,
        state.history,
        trainer.scores.rows,
        test_best=test_best,
        test_last=test_last,
        test_ema=test_ema,
        selection=picked,
        clean_known=clean,
        test_skipped=trainer.split_notes.get("test"),
        manifest=trainer.data_dir / "manifest.parquet",
        classes=trainer.classes,
        skipped=(state.corrupt_samples, state.skipped),
    )
    trainer.log.finish(summary, report.selection_table(picked, clean))
    return summary
