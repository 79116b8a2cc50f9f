"""Local pretrained weights (`model.pretrained=/path`), for clusters that cannot reach the hub:
find the weights file a path names, check that it is the backbone's state dict as timm saves it,
and say how timm loads it offline, so that timm itself adapts the first conv to the input
channels and drops the classifier, as it does for weights from the hub."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from timm.models import load_state_dict

from dtrain.errors import ConfigError

KEY = "model.pretrained"
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# what a hub download leaves in a model's folder, in timm's order of preference
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_pretrained_args(pretrained: bool | str, backbone: str) -> dict[str, Any]:
    """`timm.create_model` arguments for a `model.pretrained` value: false, true (the hub), or a
    local weights file or folder, checked, then read by timm from that file and nowhere else."""
    if isinstance(pretrained, bool):
        return {"pretrained": pretrained}
    file = checked_weights_file(pretrained, backbone)
    # a set `file` comes before the hub in timm's choice of source, so nothing is downloaded
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(file)}}


def checked_weights_file(value: str, backbone: str) -> Path:
    """The weights file `value` names, once it is known to hold `backbone`'s state dict."""
    if ":" in backbone:
        raise ConfigError(
            f"{KEY}={value!r} needs model.backbone to be a timm model name (e.g. resnet18), "
            f"not {backbone!r}, which timm resolves on the hub"
        )
    file = weights_file(value)
    check_state_dict(read_state_dict(file), backbone, file)
    return file


def weights_file(value: str) -> Path:
    """A weights file as given, or the one in a hub download's folder: the folder itself
    (model.safetensors, pytorch_model.bin) or its Hugging Face cache layout
    models--timm--NAME/snapshots/<hash>/, the snapshot that refs/main names."""
    path = Path(value).expanduser()
    expected = (
        f"true, false, a weights file ({', '.join(SUFFIXES)}) or a folder holding "
        f"{' or '.join(FOLDER_FILES)}"
    )
    if not value.strip():
        raise ConfigError(f"{KEY}={value!r} is invalid: must be {expected}")
    if not path.exists():
        raise ConfigError(f"{KEY}={value!r} is invalid: {path} does not exist; must be {expected}")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"{KEY}={value!r} is invalid: must be {expected}")
        return path
    folder = _snapshot(path) if (path / "snapshots").is_dir() else path
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(f"{KEY}={value!r} is invalid: {folder} holds no weights; must be {expected}")


def _snapshot(cache: Path) -> Path:
    """The snapshot folder of a Hugging Face cache entry: refs/main's, or the only one."""
    main = cache / "refs" / "main"
    if main.is_file() and (cache / "snapshots" / main.read_text().strip()).is_dir():
        return cache / "snapshots" / main.read_text().strip()
    snapshots = sorted(p for p in (cache / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) != 1:
        raise ConfigError(
            f"{KEY}={str(cache)!r}: {len(snapshots)} snapshots and no refs/main; "
            f"name one snapshot folder ({cache / 'snapshots'}/<hash>)"
        )
    return snapshots[0]


def read_state_dict(file: Path) -> dict[str, Any]:
    """The file read as timm reads it (timm.models.load_state_dict: safetensors, or torch.load
    with weights_only=True, which unpickles no arbitrary object)."""
    try:
        state_dict = load_state_dict(str(file), weights_only=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        AttributeError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as err:
        problem = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(
            f"{KEY}: {file} cannot be read as a state dict of tensors (safetensors, or a torch "
            f"file that loads with weights_only=True): {problem}"
        ) from err
    return state_dict


def check_state_dict(state_dict: dict[str, Any], backbone: str, file: Path) -> None:
    """Every key and shape of `backbone` as timm builds it for its pretrained weights (their
    input channels and classifier), none else; the classifier may be absent or of any size, as
    timm drops it, and BatchNorm's num_batches_tracked may be absent, as torch fills it."""
    reference = timm.create_model(backbone, pretrained=False)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head = {f"{name}.{p}" for name in classifier for p in ("weight", "bias")}
    missing = [
        k
        for k in expected
        if k not in state_dict and k not in head and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state_dict if k not in expected]
    problems = [_first("missing key", missing), _first("unexpected key", unexpected)]
    for k, value in state_dict.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        if k in expected and k not in head and shape != expected[k]:
            problems.append(f"key {k!r} has shape {shape}, the backbone's is {expected[k]}")
            break
    problems = [p for p in problems if p]
    if problems:
        in_chans = reference.pretrained_cfg.get("input_size", (3,))[0]
        raise ConfigError(
            f"{KEY}: {file} is not a state dict of backbone {backbone} as timm saves it "
            f"(in_chans={in_chans}, with or without its classifier): {'; '.join(problems)}; "
            f"set model.backbone to the weights' architecture"
        )


def _first(what: str, keys: list[str]) -> str:
    """The first key and how many more, or nothing."""
    if not keys:
        return ""
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"{what} {keys[0]!r}{more}"
