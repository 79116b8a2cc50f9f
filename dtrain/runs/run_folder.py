"""What a finished run folder says about itself: its config and the dataset it trained on, for
the commands that use a trained model (`eval`, `predict`, `review`, `dtrain.load`)."""

from __future__ import annotations

from pathlib import Path

from dtrain.config import Config, config_from_dict
from dtrain.config_values import read_yaml_mapping
from dtrain.errors import RunFolderError


def run_config(run_dir: str | Path) -> Config:
    """The resolved config a run saved as `config.yaml`."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{run_dir} holds no config.yaml: not a dtrain run folder")
    return config_from_dict(read_yaml_mapping(path, "run config"))


def run_dataset(run_dir: str | Path) -> Path:
    """The dataset folder the run trained on (the embedded set's default folder when
    `data.path` was left empty)."""
    from dtrain.prepare.data_folder import resolve_data_dir

    return resolve_data_dir(run_config(run_dir).data.path, progress=False)
