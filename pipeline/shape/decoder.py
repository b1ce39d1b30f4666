"""Triplanar NSM decoder (spec sections a-c): built from the model-config JSON, loaded from the
published checkpoint format.

The module layout mirrors the published state-dict key names exactly, so a strict load proves
that every tensor found its place:

- ``vae_decoder.fc`` (optional), ``vae_decoder.layers.<j>`` and its alias
  ``vae_decoder.decoder.<j>`` (the same modules registered twice, as in the checkpoints);
- ``sdf_decoder.layers.<i>`` with ``weight_g`` / ``weight_v`` / ``bias`` (weight norm) or
  ``weight`` / ``bias``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import FILE_ERRORS, ErrorCode, refused_on

# Config keys the decoder is built from (spec a); a missing one is an error.
DECODER_KEYS: tuple[str, ...] = (
    "latent_size",
    "objects_per_decoder",
    "conv_hidden_dims",
    "conv_deep_image_size",
    "conv_norm",
    "conv_norm_type",
    "conv_start_with_mlp",
    "sdf_latent_size",
    "sdf_hidden_dims",
    "weight_norm",
    "activation",
    "final_activation",
    "dropout_prob",
    "sum_conv_output_features",
    "conv_pred_sdf",
)

# Coordinate padding of the triplanar decoder: a constructor constant the published pipeline
# never passes, so 0.1 unless a (newer) config names it explicitly.
DEFAULT_PADDING = 0.1
_ALIAS_PREFIX = "vae_decoder.decoder."
_LAYER_PREFIX = "vae_decoder.layers."


class _Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(30.0 * x)


def _activation(name: str) -> nn.Module:
    table = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softplus": nn.Softplus,
        "elu": nn.ELU,
        "selu": nn.SELU,
        "swish": nn.SiLU,
        "sin": _Sine,
        "linear": nn.Identity,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]()


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation: W = g * V / ||V|| (norm per output row).

    Parameter names (``weight_g`` (out, 1), ``weight_v`` (out, in), ``bias``) match the
    checkpoints written with ``torch.nn.utils.weight_norm``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        lin = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.weight_g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True).clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight, self.bias)


class _VaeDecoder(nn.Module):
    """Latent -> feature planes (F, H, W): optional Linear, transposed convs (+norm), conv+tanh."""

    def __init__(
        self,
        latent_size: int,
        hidden_dims: list[int],
        deep_image_size: int,
        out_features: int,
        norm: bool,
        norm_type: str,
        start_with_mlp: bool,
    ):
        super().__init__()
        d = deep_image_size
        if latent_size % (d * d) != 0:
            raise ValueError(f"latent_size {latent_size} is not divisible by d^2 = {d * d}")
        if norm and norm_type == "layer" and d != 2:
            # The original sizes each LayerNorm as (C, d^(i+2), d^(i+2)), which equals the real
            # feature map only for d == 2; it would fail at the first forward.
            raise ValueError("layer norm in the conv branch requires conv_deep_image_size == 2")
        if norm and norm_type not in ("layer", "batch"):
            raise ValueError(f"unknown conv_norm_type {norm_type!r}")
        self.deep_image_size = d
        self.start_with_mlp = start_with_mlp
        self.latent_size = latent_size
        if start_with_mlp:
            self.fc = nn.Linear(latent_size, hidden_dims[0] * d * d)
            in_ch = hidden_dims[0]
        else:
            in_ch = latent_size // (d * d)
        self.in_channels = in_ch
        mods: list[nn.Module] = []
        for i, out_ch in enumerate(hidden_dims):
            mods.append(
                nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, padding=1, output_padding=1)
            )
            if norm:
                if norm_type == "layer":
                    side = d ** (i + 2)
                    mods.append(nn.LayerNorm((out_ch, side, side), eps=1e-5))
                else:
                    mods.append(nn.BatchNorm2d(out_ch, eps=1e-5))
            in_ch = out_ch
        mods.append(nn.Sequential(nn.Conv2d(in_ch, out_features, 3, stride=1, padding=1),
                                  nn.Tanh()))
        # Same module objects under two names: the published checkpoints store both key sets.
        self.layers = nn.ModuleList(mods)
        self.decoder = nn.Sequential(*mods)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        d = self.deep_image_size
        x = latent.reshape(1, self.latent_size)
        if self.start_with_mlp:
            x = self.fc(x)
        # No activation between the layers: the original builds one but never inserts it.
        x = x.reshape(1, self.in_channels, d, d)
        return self.decoder(x)


class _SdfDecoder(nn.Module):
    """DeepSDF-style MLP on [plane feature, xyz]; no skip connections."""

    def __init__(
        self,
        in_features: int,
        hidden_dims: list[int],
        n_objects: int,
        weight_norm: bool,
        activation: str,
        final_activation: str,
        dropout_prob: float,
    ):
        super().__init__()
        widths = [in_features, *hidden_dims, n_objects]
        make = WeightNormLinear if weight_norm else nn.Linear
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nn.ModuleList(make(a, b) for a, b in pairs)
        self.activation = _activation(activation)
        self.final_activation = _activation(final_activation)
        self.dropout = nn.Dropout(dropout_prob) if dropout_prob > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.activation(x)
                if self.dropout is not None:
                    x = self.dropout(x)
        return self.final_activation(x)


class TriplanarDecoder(nn.Module):
    """NSM triplanar decoder: latent (D,) + points (N, 3) -> SDF (N, n_objects)."""

    def __init__(
        self,
        latent_size: int,
        objects_per_decoder: int,
        conv_hidden_dims: list[int],
        conv_deep_image_size: int,
        conv_norm: bool,
        conv_norm_type: str,
        conv_start_with_mlp: bool,
        sdf_latent_size: int,
        sdf_hidden_dims: list[int],
        weight_norm: bool,
        activation: str,
        final_activation: str,
        dropout_prob: float,
        sum_conv_output_features: bool,
        conv_pred_sdf: bool,
        padding: float = DEFAULT_PADDING,
    ):
        super().__init__()
        L = sdf_latent_size
        if not sum_conv_output_features:
            if L % 3 != 0:
                raise ValueError("sdf_latent_size must be divisible by 3 when concatenating")
            if conv_pred_sdf:
                raise ValueError("conv_pred_sdf with concatenated plane features is unsupported")
        n_feat = (3 * L if sum_conv_output_features else L) + (3 if conv_pred_sdf else 0)
        self.latent_size = latent_size
        self.n_objects = objects_per_decoder
        self.sdf_latent_size = L
        self.sum_features = sum_conv_output_features
        self.pred_sdf = conv_pred_sdf
        self.padding = padding
        self.plane_channels = L + (1 if conv_pred_sdf else 0)
        self.vae_decoder = _VaeDecoder(
            latent_size, list(conv_hidden_dims), conv_deep_image_size, n_feat,
            conv_norm, conv_norm_type, conv_start_with_mlp,
        )
        self.sdf_decoder = _SdfDecoder(
            L + 3, list(sdf_hidden_dims), objects_per_decoder, weight_norm, activation,
            final_activation, dropout_prob,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TriplanarDecoder:
        """Build from a model-config dict (spec a); every decoder key must be present."""
        missing = [k for k in DECODER_KEYS if k not in config]
        if missing:
            raise KeyError(f"model config lacks decoder keys: {missing}")
        kwargs = {k: config[k] for k in DECODER_KEYS}
        return cls(**kwargs, padding=float(config.get("padding", DEFAULT_PADDING)))

    def planes(self, latent: torch.Tensor) -> torch.Tensor:
        """Conv-branch output for one latent: (F, H, W) feature planes (xz, yz, xy blocks)."""
        return self.vae_decoder(latent)[0]

    def sdf_from_planes(self, planes: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """SDF (N, n_objects) at normalised points ``xyz`` (N, 3) from precomputed planes."""
        c = self.plane_channels
        scale = 1.0 + self.padding + 1e-5
        x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        # Block order xz, yz, xy is fixed by the checkpoints; (u, v) = (width, height).
        coords = ((x, z), (y, z), (x, y))
        samples = []
        for k, (u, v) in enumerate(coords):
            block = planes[k * c:(k + 1) * c]
            if block.shape[0] == 0:
                continue  # concatenation quirk: only the xz block is non-empty
            grid = torch.stack((u, v), dim=-1).div(scale).clamp(-1.0, 1.0)
            s = F.grid_sample(
                block.unsqueeze(0), grid.reshape(1, -1, 1, 2), mode="bilinear",
                padding_mode="border", align_corners=True,
            )
            samples.append(s[0, :, :, 0].transpose(0, 1))
        feat = torch.stack(samples).sum(0) if self.sum_features else torch.cat(samples, dim=1)
        low_freq = None
        if self.pred_sdf:
            low_freq, feat = feat[:, :1], feat[:, 1:]
        out = self.sdf_decoder(torch.cat((feat, xyz), dim=1))
        if low_freq is not None:
            out = out + low_freq
        return out

    def sdf(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        """SDF (N, n_objects) for one latent (D,) or (1, D) at points ``xyz`` (N, 3)."""
        return self.sdf_from_planes(self.planes(latent), xyz)

    def forward(self, latent: torch.Tensor, xyz: torch.Tensor) -> torch.Tensor:
        return self.sdf(latent, xyz)


def load_config(config_json_path: str | Path) -> dict[str, Any]:
    """Read a model-config JSON into a dict."""
    with open(config_json_path, encoding="utf-8") as fh:
        return json.load(fh)


def _check_aliases(state: Mapping[str, torch.Tensor]) -> None:
    """The ``vae_decoder.decoder.*`` keys must duplicate ``vae_decoder.layers.*`` exactly,
    otherwise whichever is loaded last would silently win."""
    for key, value in state.items():
        if not key.startswith(_ALIAS_PREFIX):
            continue
        orig = _LAYER_PREFIX + key[len(_ALIAS_PREFIX):]
        if orig not in state:
            raise ValueError(f"alias key {key!r} has no original {orig!r}")
        ref = state[orig]
        if ref.shape != value.shape or not torch.equal(ref, value):
            raise ValueError(f"alias key {key!r} differs from {orig!r}")


def load_decoder(
    config_json_path: str | Path,
    checkpoint_path: str | Path,
    device: str | torch.device = "cpu",
) -> TriplanarDecoder:
    """Build the decoder from its config JSON and load a published checkpoint strictly.

    Returns the module in eval mode with frozen parameters. Any problem with the files raises
    ``PipelineError(MODEL_UNAVAILABLE)``.
    """
    with refused_on(FILE_ERRORS, ErrorCode.MODEL_UNAVAILABLE,
                    f"cannot build the shape model from {config_json_path}",
                    "Re-download the model folder or point to a valid model_config JSON."):
        config = load_config(config_json_path)
        model = TriplanarDecoder.from_config(config)
    # Unpickling, shape and key errors all mean "unusable", whatever their type.
    with refused_on((Exception,), ErrorCode.MODEL_UNAVAILABLE,
                    f"cannot load shape-model checkpoint {checkpoint_path}",
                    "The file is incomplete or does not belong to this config; re-download it."):
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, Mapping) or "model" not in ckpt:
            raise ValueError("checkpoint is not a dict with a 'model' state dict")
        state = ckpt["model"]
        _check_aliases(state)
        model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def count_parameters(model: nn.Module) -> int:
    """Unique parameter count (aliases counted once)."""
    return sum(math.prod(p.shape) for p in model.parameters())
