"""Local pretrained weights (issue #12): `model.pretrained` as a weights file or a hub download
folder, loaded offline through timm (its first-conv adaptation, its classifier drop), checked
before any work, and read without unpickling arbitrary objects."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from timm.models import adapt_input_conv

from dtrain.config import Config, ModelConfig, config_from_dict, load_config
from dtrain.errors import ConfigError
from dtrain.methods.model import make_encoder

BACKBONE = "test_resnet"  # timm's tiny ResNet: a deep stem whose first conv is conv1.0
FIRST_CONV = "conv1.0.weight"
HEAD = {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, torch.Tensor]:
    """test_resnet's state dict as timm saves it (3 input channels, 1000-class fc), every
    tensor random, so that no default initialisation can match it by chance."""
    generator = torch.Generator().manual_seed(7)
    state = timm.create_model(BACKBONE).state_dict()
    return {
        k: (torch.randn(v.shape, generator=generator).abs() if v.is_floating_point() else v + 11)
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    save_file(weights, folder / "w.safetensors")
    torch.save(weights, folder / "w.pth")
    return {"safetensors": folder / "w.safetensors", "pth": folder / "w.pth"}


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_loaded(encoder: torch.nn.Module, weights: dict, in_chans: int) -> None:
    """Every tensor of the encoder is the file's, the first conv adapted by timm to `in_chans`;
    the classifier is gone."""
    state = encoder.state_dict()
    assert set(state) == set(weights) - HEAD
    assert isinstance(encoder.get_classifier(), torch.nn.Identity)
    for key, value in state.items():
        expected = weights[key]
        if key == FIRST_CONV and in_chans != 3:
            expected = adapt_input_conv(in_chans, expected)
        assert torch.equal(value, expected), key
    assert state[FIRST_CONV].shape[1] == in_chans


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_a_weights_file_is_loaded_offline_through_timm(offline, files, weights, kind, in_chans):
    config = ModelConfig(backbone=BACKBONE, pretrained=str(files[kind]))
    assert_loaded(make_encoder(config, in_chans), weights, in_chans)


def test_hub_download_folders_are_found(offline, tmp_path, files, weights):
    """A folder holding pytorch_model.bin, and the Hugging Face cache layout (refs/main names
    the snapshot; the snapshot's file is a link into blobs/), as a hub download leaves them."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "pytorch_model.bin").write_bytes(files["pth"].read_bytes())
    cache = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    for name in ("blobs", "refs", "snapshots/0ld", "snapshots/abc123"):
        (cache / name).mkdir(parents=True)
    (cache / "blobs" / "f00d").write_bytes(files["safetensors"].read_bytes())
    (cache / "refs" / "main").write_text("abc123")
    (cache / "snapshots" / "abc123" / "model.safetensors").symlink_to("../../blobs/f00d")
    for folder in (plain, cache, cache / "snapshots" / "abc123"):
        encoder = make_encoder(ModelConfig(backbone=BACKBONE, pretrained=str(folder)), 1)
        assert_loaded(encoder, weights, 1)
    (cache / "refs" / "main").unlink()
    with pytest.raises(ConfigError, match="2 snapshots and no refs/main; name one"):
        make_encoder(ModelConfig(backbone=BACKBONE, pretrained=str(cache)), 1)


def validate(*overrides: str) -> Config:
    config = load_config(None, [f"model.backbone={BACKBONE}", *overrides])
    config.validate()
    return config


def test_a_missing_path_or_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError) as err:
        validate(f"model.pretrained={tmp_path}/gone.pth")
    assert "model.pretrained" in str(err.value) and f"{tmp_path}/gone.pth" in str(err.value)
    with pytest.raises(ConfigError, match=f"model.pretrained.*{tmp_path}.* holds no weights"):
        validate(f"model.pretrained={tmp_path}")
    with pytest.raises(ConfigError, match="model.pretrained=''"):
        validate("model.pretrained=")
    (tmp_path / "notes.txt").write_text("weights")
    with pytest.raises(ConfigError, match=r"model.pretrained=.*notes.txt.*\.safetensors"):
        validate(f"model.pretrained={tmp_path}/notes.txt")


def test_weights_of_another_backbone_are_refused_naming_file_and_key(tmp_path, files):
    other = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), other)
    with pytest.raises(ConfigError) as err:
        validate(f"model.pretrained={other}")
    message = str(err.value)
    assert str(other) in message and f"backbone {BACKBONE}" in message
    missing = re.search(r"missing key '([^']+)'", message).group(1)
    unexpected = re.search(r"unexpected key '([^']+)'", message).group(1)
    assert missing in timm.create_model(BACKBONE).state_dict()
    assert unexpected in timm.create_model("test_vit").state_dict()
    assert "\n" not in message
    with pytest.raises(ConfigError, match=f"{other}.*backbone {BACKBONE}"):
        make_encoder(ModelConfig(backbone=BACKBONE, pretrained=str(other)), 1)
    # the right keys, but a first conv already cut to one channel (not as timm saves it)
    grey = timm.create_model(BACKBONE, in_chans=1).state_dict()
    save_file(grey, tmp_path / "grey.safetensors")
    shape = re.escape(f"key '{FIRST_CONV}' has shape {tuple(grey[FIRST_CONV].shape)}")
    with pytest.raises(ConfigError, match=shape):
        validate(f"model.pretrained={tmp_path}/grey.safetensors")
    # a backbone's state dict without one tensor
    save_file({k: v for k, v in grey.items() if k != "layer4.0.bn1.bias"}, tmp_path / "cut.pt")
    with pytest.raises(ConfigError, match="cannot be read"):  # .pt is torch, not safetensors
        validate(f"model.pretrained={tmp_path}/cut.pt")
    three = timm.create_model(BACKBONE).state_dict()
    torch.save({k: v for k, v in three.items() if k != "layer4.0.bn1.bias"}, tmp_path / "cut.pt")
    with pytest.raises(ConfigError, match="missing key 'layer4.0.bn1.bias'"):
        validate(f"model.pretrained={tmp_path}/cut.pt")


class Payload:
    """What a hostile .pth could carry: unpickling it runs code (it writes a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_pickle_with_objects_is_refused_unread(tmp_path, weights):
    marker = tmp_path / "ran"
    torch.save({**weights, "extra": Payload(marker)}, tmp_path / "hostile.pth")
    with pytest.raises(ConfigError, match="hostile.pth cannot be read .*weights_only=True"):
        validate(f"model.pretrained={tmp_path}/hostile.pth")
    assert not marker.exists()


def test_pretrained_values_coerce_and_are_recorded(tmp_path):
    assert load_config(None, ["model.pretrained=/x.pth"]).model.pretrained == "/x.pth"
    assert load_config(None, ["model.pretrained=true"]).model.pretrained is True
    assert load_config(None, ["model.pretrained=false"]).model.pretrained is False
    assert load_config().model.pretrained is False
    path = tmp_path / "c.yaml"
    for value in ("/w/resnet.safetensors", True):
        path.write_text(yaml.safe_dump({"model": {"pretrained": value}}))
        config = load_config(path)
        assert config.model.pretrained == value
        # as the run folder's config.yaml records it: a resume must name the same weights
        saved = yaml.safe_load(yaml.safe_dump(config.to_dict()))
        assert config_from_dict(saved).identity() == config.identity()
    assert (
        load_config(None, ["model.pretrained=/a.pth"]).identity()
        != load_config(None, ["model.pretrained=/b.pth"]).identity()
    )
    path.write_text(yaml.safe_dump({"model": {"pretrained": ["/x.pth"]}}))
    with pytest.raises(ConfigError, match="model.pretrained=.* must be a bool .* or a string"):
        load_config(path)


def test_the_small_stem_replaces_a_deep_stem_too():
    import torch

    from dtrain.config import ModelConfig
    from dtrain.methods.model import make_encoder

    encoder = make_encoder(ModelConfig(backbone="test_resnet", stem="small"), in_chans=1)
    assert isinstance(encoder.conv1, torch.nn.Conv2d) and encoder.conv1.stride == (1, 1)
    assert encoder(torch.zeros(2, 1, 16, 16)).shape[0] == 2
