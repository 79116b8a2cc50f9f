"""The training side: streaming loader, model, losses, engines, trainer, report."""
