"""The network of method.md: a timm encoder f, a linear classifier g, a projection head p for the
contrastive loss, and the intra-group attention block that weighs each sample of a group."""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config import ModelConfig
from dtrain.errors import ConfigError
from dtrain.methods.pretrained import timm_pretrained_args
from dtrain.methods.registry import METHODS


class GroupAttention(nn.Module):
    """a_i = sigmoid(w . relu(A h_i + Bc g + E[y_i] + U c_i)) for each member i of a group, with g
    the group's mean feature and c_i = (p_i(y_i), entropy(p_i) / log C) from detached logits.
    `inputs` picks which terms it sees: feature, feature+label, feature+label+confidence."""

    def __init__(self, dim: int, num_classes: int, hidden: int, inputs: str) -> None:
        super().__init__()
        self.inputs = inputs
        self.num_classes = num_classes
        self.feature = nn.Linear(dim, hidden)
        self.group = nn.Linear(dim, hidden, bias=False)
        self.label = nn.Embedding(num_classes, hidden) if "label" in inputs else None
        self.confidence = nn.Linear(2, hidden, bias=False) if "confidence" in inputs else None
        self.score = nn.Linear(hidden, 1)

    def forward(
        self,
        h: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h [G, K, D], labels [G, K], logits [G, K, C], valid [G, K] -> weights [G, K] in
        (0, 1)."""
        if valid is None:
            mean = h.mean(dim=1, keepdim=True)
        else:
            members = valid.unsqueeze(-1).to(h.dtype)
            mean = (h * members).sum(1, keepdim=True) / members.sum(1, keepdim=True).clamp_min(1)
        x = self.feature(h) + self.group(mean)
        if self.label is not None:
            x = x + self.label(labels)
        if self.confidence is not None:
            probs = logits.detach().float().softmax(dim=-1)
            given = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(self.num_classes)
            x = x + self.confidence(torch.stack([given, entropy], dim=-1).to(x.dtype))
        return torch.sigmoid(self.score(F.relu(x))).squeeze(-1)


def make_encoder(config: ModelConfig, in_chans: int) -> nn.Module:
    """A timm backbone without its classifier (pooled features out). Pretrained weights (the hub,
    or a local file: dtrain.methods.pretrained) are loaded by timm, which adapts the first conv to
    `in_chans` and drops the classifier. model.stem=small then replaces the stem, so the
    pretrained stem (conv1) is dropped and trains from scratch."""
    encoder = timm.create_model(
        config.backbone,
        num_classes=0,
        in_chans=in_chans,
        **timm_pretrained_args(config.pretrained, config.backbone),
    )
    if config.stem == "small":
        if not (hasattr(encoder, "conv1") and hasattr(encoder, "maxpool")):
            raise ConfigError(
                f"model.stem=small needs a ResNet-style backbone with conv1 and "
                f"maxpool; {config.backbone} has neither; use model.stem=imagenet"
            )
        # a deep stem (resnet*d, test_resnet) is a Sequential: its last conv feeds bn1
        out = [m for m in encoder.conv1.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        encoder.conv1 = nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
        encoder.maxpool = nn.Identity()
    return encoder


class NoiseRobustNet(nn.Module):
    """f, g, p and the attention block; `forward` is test time: f and g on the plain image."""

    def __init__(self, config: ModelConfig, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.encoder = make_encoder(config, in_chans)
        dim = self.encoder.num_features
        self.classifier = nn.Linear(dim, num_classes)
        self.projector = nn.Sequential(
            nn.Linear(dim, config.projection_hidden),
            nn.BatchNorm1d(config.projection_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(config.projection_hidden, config.projection_dim),
        )
        self.attention = GroupAttention(
            dim, num_classes, config.attention_hidden, config.attention_inputs
        )

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(h), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


class CoTeachingNet(nn.Module):
    """Two peer networks (Han et al. 2018); the first one answers at test time."""

    def __init__(self, config: ModelConfig, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.peers = nn.ModuleList(
            [NoiseRobustNet(config, num_classes, in_chans) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peers[0](x)


def build_model(config: ModelConfig, method: str, num_classes: int, in_chans: int) -> nn.Module:
    """The network the method trains (two peers for Co-teaching, per the registry)."""
    cls = CoTeachingNet if METHODS[method].model == "peers" else NoiseRobustNet
    return cls(config, num_classes, in_chans)
