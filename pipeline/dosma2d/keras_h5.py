"""A Keras 2 legacy ``.h5`` model as a torch module, built from the graph stored in the file.

DOSMA's 2D knee U-Nets exist only as full Keras models (``model_config`` + ``model_weights``);
no public code builds their architecture. So nothing here is hard-coded: :func:`load_keras_h5`
parses ``model_config``, builds one torch op per layer with every option read from the layer's
config (never a torch default) and loads the weights by layer name in ``weight_names`` order.
Layer semantics follow ``../shared/fixtures/dosma2d/README.md`` §5.1: channels-first NCHW,
TF's asymmetric ``same`` padding, TF's transposed-conv cropping, per-layer BN epsilon, per-element
PReLU alphas, and Keras' softmax ``Activation`` over the LAST axis.

A layer class or option the runner does not know is refused (``MODEL_UNAVAILABLE`` naming it)
rather than guessed. Inference only: dropout is the identity and BN uses moving statistics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ErrorCode, PipelineError

# Config keys that only matter for training or bookkeeping.
_IGNORED_KEYS = {"name", "trainable", "dtype", "batch_input_shape", "batch_size"}
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


class KerasModelError(PipelineError):
    """A ``.h5`` file that is not a Keras model this runner can build."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.MODEL_UNAVAILABLE, message)


# ---------------------------------------------------------------- padding rules (TF)


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise KerasModelError(f"cannot read {what} {value!r}")


def _same_pads(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TF ``same``: total padding split with the odd pixel at the end (bottom/right)."""
    total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def _box(value: Any, what: str) -> tuple[int, int, int, int]:
    """``ZeroPadding2D``/``Cropping2D`` amounts as (top, bottom, left, right)."""
    if isinstance(value, int):
        return value, value, value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        if all(isinstance(v, int) for v in value):
            return value[0], value[0], value[1], value[1]
        (t, b), (left, r) = (_pair(v, what) for v in value)
        return t, b, left, r
    raise KerasModelError(f"cannot read {what} {value!r}")


# ---------------------------------------------------------------- activations

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "relu": F.relu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    # Keras' softmax activation normalises over the last axis (W for a 4-D NCHW tensor).
    "softmax": lambda x: torch.softmax(x, dim=-1),
}


def _activation(name: Any, layer: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise KerasModelError(
            f"layer {layer!r}: activation {name!r} is not supported "
            f"(supported: {', '.join(_ACTIVATIONS)}).")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------- layer ops


class _Op(nn.Module):
    """One Keras layer. ``weight_names`` are the names its weights load into, in order."""

    weight_names: tuple[str, ...] = ()

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def set_weights(self, arrays: list[np.ndarray]) -> None:
        if len(arrays) != len(self.weight_names):
            raise KerasModelError(
                f"layer {self.layer!r} has {len(arrays)} weights in the file, expected "
                f"{len(self.weight_names)} ({', '.join(self.weight_names) or 'none'}).")
        for name, array in zip(self.weight_names, arrays, strict=True):
            target = getattr(self, name)
            value = torch.from_numpy(np.ascontiguousarray(self._convert(name, array)))
            if tuple(value.shape) != tuple(target.shape):
                raise KerasModelError(
                    f"layer {self.layer!r}: weight {name} has shape {tuple(array.shape)} in "
                    f"the file, which does not fit the layer ({tuple(target.shape)} expected).")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))

    def _convert(self, name: str, array: np.ndarray) -> np.ndarray:
        return array

    def _kernel_and_bias(self, kernel_shape: tuple[int, ...], filters: int, cfg: dict) -> None:
        """Parameters of a convolution: ``weight`` (torch layout) and, with ``use_bias``, bias."""
        self.weight = _param(*kernel_shape)
        self.bias = _param(filters) if cfg.get("use_bias", True) else None
        self.weight_names = ("weight", "bias") if self.bias is not None else ("weight",)


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class _Conv2D(_Op):
    def __init__(self, layer: str, cfg: dict, in_ch: int) -> None:
        super().__init__(layer)
        self.k = _pair(cfg["kernel_size"], "kernel_size")
        self.s = _pair(cfg.get("strides", 1), "strides")
        self.d = _pair(cfg.get("dilation_rate", 1), "dilation_rate")
        self.groups = int(cfg.get("groups", 1))
        self.padding = cfg.get("padding", "valid")
        self.act = _activation(cfg.get("activation", "linear"), layer)
        if self.s != (1, 1) and self.d != (1, 1):
            raise KerasModelError(f"layer {layer!r}: strides and dilation together")
        if in_ch % self.groups:
            raise KerasModelError(f"layer {layer!r}: {in_ch} channels in {self.groups} groups")
        filters = int(cfg["filters"])
        self._kernel_and_bias((filters, in_ch // self.groups, *self.k), filters, cfg)

    def _convert(self, name: str, array: np.ndarray) -> np.ndarray:
        # Keras kernel (kh, kw, in, out) -> torch (out, in, kh, kw).
        return array.transpose(3, 2, 0, 1) if name == "weight" else array

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            (t, b), (left, r) = (_same_pads(n, k, s, d) for n, k, s, d in
                                 zip(x.shape[2:], self.k, self.s, self.d, strict=True))
            x = F.pad(x, (left, r, t, b))
        y = F.conv2d(x, self.weight, self.bias, self.s, 0, self.d, self.groups)
        return self.act(y)


class _Conv2DTranspose(_Op):
    def __init__(self, layer: str, cfg: dict, in_ch: int) -> None:
        super().__init__(layer)
        self.k = _pair(cfg["kernel_size"], "kernel_size")
        self.s = _pair(cfg.get("strides", 1), "strides")
        self.padding = cfg.get("padding", "valid")
        self.act = _activation(cfg.get("activation", "linear"), layer)
        if _pair(cfg.get("dilation_rate", 1), "dilation_rate") != (1, 1):
            raise KerasModelError(f"layer {layer!r} (Conv2DTranspose): dilation_rate is not "
                                  "supported")
        if cfg.get("output_padding") is not None:
            raise KerasModelError(f"layer {layer!r} (Conv2DTranspose): output_padding is not "
                                  "supported")
        if int(cfg.get("groups", 1)) != 1:
            raise KerasModelError(f"layer {layer!r} (Conv2DTranspose): groups is not supported")
        if self.padding == "same" and any(k < s for k, s in zip(self.k, self.s, strict=True)):
            raise KerasModelError(f"layer {layer!r} (Conv2DTranspose): 'same' with a kernel "
                                  "smaller than its stride is not supported")
        filters = int(cfg["filters"])
        self._kernel_and_bias((in_ch, filters, *self.k), filters, cfg)

    def _convert(self, name: str, array: np.ndarray) -> np.ndarray:
        # Keras kernel (kh, kw, out, in) -> torch ConvTranspose (in, out, kh, kw).
        return array.transpose(3, 2, 0, 1) if name == "weight" else array

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.weight, self.bias, self.s)  # full: (n - 1)·s + k
        if self.padding == "same":
            # TF keeps n·s: of the k − s extra pixels, (k − s) // 2 go at the start.
            (eh, ew) = (k - s for k, s in zip(self.k, self.s, strict=True))
            h, w = x.shape[2] * self.s[0], x.shape[3] * self.s[1]
            y = y[:, :, eh // 2: eh // 2 + h, ew // 2: ew // 2 + w]
        return self.act(y)


class _BatchNorm(_Op):
    def __init__(self, layer: str, cfg: dict, in_ch: int) -> None:
        super().__init__(layer)
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (1, -3):
            raise KerasModelError(f"layer {layer!r} (BatchNormalization): axis {axis!r}; only "
                                  "the channel axis 1 of channels-first tensors is supported")
        self.eps = float(cfg["epsilon"])
        names = []
        if cfg.get("scale", True):
            self.gamma = _param(in_ch)
            names.append("gamma")
        if cfg.get("center", True):
            self.beta = _param(in_ch)
            names.append("beta")
        self.moving_mean = _param(in_ch)
        self.moving_variance = _param(in_ch)
        self.weight_names = (*names, "moving_mean", "moving_variance")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        y = (x - self.moving_mean.view(shape)) / torch.sqrt(
            self.moving_variance.view(shape) + self.eps)
        if "gamma" in self.weight_names:
            y = y * self.gamma.view(shape)
        if "beta" in self.weight_names:
            y = y + self.beta.view(shape)
        return y


class _PReLU(_Op):
    def __init__(self, layer: str, cfg: dict, in_shape: tuple[int, ...]) -> None:
        super().__init__(layer)
        shared = cfg.get("shared_axes") or []
        shape = [1 if axis in shared else n for axis, n in enumerate(in_shape[1:], 1)]
        self.alpha = _param(*shape)
        self.weight_names = ("alpha",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class _Fn(_Op):
    """A weightless layer: ``fn(*inputs)``."""

    def __init__(self, layer: str, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__(layer)
        self.fn = fn

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)


def _pool(layer: str, cfg: dict, kind: str) -> _Fn:
    k = _pair(cfg.get("pool_size", 2), "pool_size")
    s = _pair(cfg.get("strides") or k, "strides")
    same = cfg.get("padding", "valid") == "same"

    def pool(x: torch.Tensor) -> torch.Tensor:
        if not same:
            return (F.max_pool2d if kind == "max" else F.avg_pool2d)(x, k, s)
        (t, b), (left, r) = (_same_pads(n, kk, ss) for n, kk, ss in
                             zip(x.shape[2:], k, s, strict=True))
        if kind == "max":
            return F.max_pool2d(F.pad(x, (left, r, t, b), value=-math.inf), k, s)
        # TF's average excludes the padding: divide by the count of real pixels per window.
        total = F.avg_pool2d(F.pad(x, (left, r, t, b)), k, s)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return total / F.avg_pool2d(F.pad(ones, (left, r, t, b)), k, s)

    return _Fn(layer, pool)


def _upsample(layer: str, cfg: dict) -> _Fn:
    sh, sw = _pair(cfg.get("size", 2), "size")
    mode = cfg.get("interpolation", "nearest")
    if mode == "nearest":
        return _Fn(layer, lambda x: x.repeat_interleave(sh, 2).repeat_interleave(sw, 3))
    if mode == "bilinear":
        return _Fn(layer, lambda x: F.interpolate(x, scale_factor=(sh, sw), mode="bilinear",
                                                  align_corners=False))
    raise KerasModelError(f"layer {layer!r} (UpSampling2D): interpolation {mode!r} is not "
                          "supported (nearest, bilinear)")


def _leaky(slope: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.leaky_relu(x, slope)


def _relu(layer: str, cfg: dict) -> _Fn:
    max_value = cfg.get("max_value")
    slope = float(cfg.get("negative_slope", 0.0))
    threshold = float(cfg.get("threshold", 0.0))

    def relu(x: torch.Tensor) -> torch.Tensor:
        y = torch.where(x >= threshold, x, slope * (x - threshold))
        return y if max_value is None else torch.clamp(y, max=float(max_value))

    return _Fn(layer, relu)


def _concatenate(layer: str, cfg: dict) -> _Fn:
    axis = int(cfg.get("axis", -1))
    return _Fn(layer, lambda *xs: torch.cat(xs, dim=axis))


def _add(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


# Per class: the config options it reads (anything else set in a file is refused).
_OPTIONS: dict[str, set[str]] = {
    "InputLayer": {"sparse", "ragged"},
    "Conv2D": {"filters", "kernel_size", "strides", "padding", "data_format", "dilation_rate",
               "groups", "activation", "use_bias"},
    "Conv2DTranspose": {"filters", "kernel_size", "strides", "padding", "data_format",
                        "dilation_rate", "groups", "activation", "use_bias", "output_padding"},
    "BatchNormalization": {"axis", "momentum", "epsilon", "center", "scale"},
    "PReLU": {"shared_axes"},
    "Dropout": {"rate", "noise_shape", "seed"},
    "SpatialDropout2D": {"rate", "noise_shape", "seed", "data_format"},
    "Add": set(),
    "Concatenate": {"axis"},
    "UpSampling2D": {"size", "interpolation", "data_format"},
    "MaxPooling2D": {"pool_size", "strides", "padding", "data_format"},
    "AveragePooling2D": {"pool_size", "strides", "padding", "data_format"},
    "ZeroPadding2D": {"padding", "data_format"},
    "Cropping2D": {"cropping", "data_format"},
    "Softmax": {"axis"},
    "Activation": {"activation"},
    "LeakyReLU": {"alpha", "negative_slope"},
    "ReLU": {"max_value", "negative_slope", "threshold"},
    "ELU": {"alpha"},
}
SUPPORTED_LAYERS = tuple(_OPTIONS)


def _check_options(cls: str, layer: str, cfg: dict) -> None:
    for key, value in cfg.items():
        if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES) or key in _OPTIONS[cls]:
            continue
        if value is None:
            continue
        raise KerasModelError(f"layer {layer!r} ({cls}): option {key}={value!r} is not "
                              "supported by the torch runner")
    if "padding" in _OPTIONS[cls] and cls != "ZeroPadding2D" and \
            cfg.get("padding", "valid") not in ("same", "valid"):
        raise KerasModelError(f"layer {layer!r} ({cls}): padding {cfg['padding']!r} is not "
                              "supported (same, valid)")
    fmt = cfg.get("data_format")
    if fmt is not None and fmt != "channels_first":
        raise KerasModelError(f"layer {layer!r} ({cls}): data_format {fmt!r}; only "
                              "channels_first models are supported")
    if cls in ("Dropout", "SpatialDropout2D") and cfg.get("noise_shape") is not None:
        raise KerasModelError(f"layer {layer!r} ({cls}): noise_shape is not supported")


def _build_op(cls: str, layer: str, cfg: dict, in_shapes: list[tuple[int, ...]]) -> _Op:
    """The torch op of one layer, given its input shapes (N, C, H, W)."""
    if cls not in _OPTIONS:
        raise KerasModelError(
            f"layer {layer!r}: Keras layer class {cls!r} is not supported by the torch runner "
            f"(supported: {', '.join(SUPPORTED_LAYERS)}).")
    _check_options(cls, layer, cfg)
    in_ch = in_shapes[0][1] if in_shapes else 0
    if cls == "Conv2D":
        return _Conv2D(layer, cfg, in_ch)
    if cls == "Conv2DTranspose":
        return _Conv2DTranspose(layer, cfg, in_ch)
    if cls == "BatchNormalization":
        return _BatchNorm(layer, cfg, in_ch)
    if cls == "PReLU":
        return _PReLU(layer, cfg, in_shapes[0])
    if cls in ("Dropout", "SpatialDropout2D"):
        return _Fn(layer, lambda x: x)
    if cls == "Add":
        return _Fn(layer, _add)
    if cls == "Concatenate":
        return _concatenate(layer, cfg)
    if cls == "UpSampling2D":
        return _upsample(layer, cfg)
    if cls in ("MaxPooling2D", "AveragePooling2D"):
        return _pool(layer, cfg, "max" if cls == "MaxPooling2D" else "avg")
    if cls == "ZeroPadding2D":
        t, b, left, r = _box(cfg["padding"], "padding")
        return _Fn(layer, lambda x: F.pad(x, (left, r, t, b)))
    if cls == "Cropping2D":
        t, b, left, r = _box(cfg["cropping"], "cropping")
        return _Fn(layer, lambda x: x[:, :, t: x.shape[2] - b, left: x.shape[3] - r])
    if cls == "Softmax":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int):
            raise KerasModelError(f"layer {layer!r} (Softmax): axis {axis!r}; one axis is "
                                  "supported")
        return _Fn(layer, lambda x: torch.softmax(x, dim=axis))
    if cls == "Activation":
        return _Fn(layer, _activation(cfg["activation"], layer))
    if cls == "LeakyReLU":
        alpha = cfg["negative_slope"] if "negative_slope" in cfg else cfg.get("alpha", 0.3)
        return _Fn(layer, _leaky(float(alpha)))
    if cls == "ReLU":
        return _relu(layer, cfg)
    if cls == "ELU":
        alpha = float(cfg.get("alpha", 1.0))
        return _Fn(layer, lambda x: F.elu(x, alpha))
    raise AssertionError(cls)  # every class in _OPTIONS is handled above


# ---------------------------------------------------------------- the graph


@dataclass(frozen=True)
class _Node:
    name: str
    cls: str
    inputs: tuple[str, ...]


class KerasGraph(nn.Module):
    """A Keras functional model (one input) as a torch module, for inference.

    ``forward(x)`` returns the outputs in ``output_layers`` order (a tuple when there are
    several); ``forward(x, keep=True)`` returns every layer's output by name (for debugging a
    port layer by layer). ``input_shape`` is (C, H, W) from the InputLayer.
    """

    def __init__(self, nodes: list[_Node], ops: dict[str, _Op], input_name: str,
                 outputs: list[str], input_shape: tuple[int, int, int],
                 keras_version: str) -> None:
        super().__init__()
        self.nodes = nodes
        self.ops = nn.ModuleDict({n.name: ops[n.name] for n in nodes if n.name in ops})
        self.input_name = input_name
        self.output_names = outputs
        self.input_shape = input_shape
        self.keras_version = keras_version
        # After which node each tensor can be freed (the graph is large at 512×512).
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for src in node.inputs:
                last_use[src] = i
        self._free_after = {i: [s for s, j in last_use.items() if j == i and s not in outputs]
                            for i in range(len(nodes))}

    def forward(self, x: torch.Tensor, keep: bool = False):
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input of shape {tuple(x.shape)}; the model takes "
                             f"(N, {', '.join(map(str, self.input_shape))})")
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for i, node in enumerate(self.nodes):
            if node.name != self.input_name:
                values[node.name] = self.ops[node.name](*(values[s] for s in node.inputs))
            if not keep:
                for name in self._free_after[i]:
                    del values[name]
        if keep:
            return values
        outs = tuple(values[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def layer_classes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.cls] = counts.get(node.cls, 0) + 1
        return counts

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _inbound(layer: dict) -> tuple[str, ...]:
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return ()
    if len(nodes) != 1 or not isinstance(nodes[0], list):
        raise KerasModelError(
            f"layer {layer.get('name')!r} is called {len(nodes)} times or in an unknown "
            "inbound_nodes format (Keras 3 files are not supported; shared layers neither)")
    sources = []
    for entry in nodes[0]:
        if not isinstance(entry, list) or len(entry) < 3 or entry[1] != 0 or entry[2] != 0:
            raise KerasModelError(f"layer {layer.get('name')!r}: inbound node {entry!r} is not "
                                  "supported (shared layers or multi-output layers)")
        if len(entry) > 3 and entry[3]:
            raise KerasModelError(f"layer {layer.get('name')!r}: call arguments {entry[3]!r} "
                                  "are not supported")
        sources.append(str(entry[0]))
    return tuple(sources)


def _batch_shape(cfg: dict) -> list | None:
    """An InputLayer's (N, C, H, W): Keras 2 ``batch_input_shape``, Keras 3 ``batch_shape``."""
    return cfg.get("batch_input_shape") or cfg.get("batch_shape")


def input_shape_of(path: str | Path) -> tuple[int, ...] | None:
    """The (C, H, W) input of the ``.h5`` model at ``path``, from its graph alone (no weights
    read); None when the file holds no 4-D InputLayer first."""
    import h5py

    with h5py.File(path, "r") as f:
        config = json.loads(_text(f.attrs["model_config"]))
    first = config["config"]["layers"][0]
    shape = _batch_shape(first.get("config", {})) if first["class_name"] == "InputLayer" else None
    return tuple(int(v) for v in shape[1:]) if shape and len(shape) == 4 else None


def _output_shape(op: _Op, in_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    with torch.no_grad():
        xs = [torch.zeros((1, *s[1:])) for s in in_shapes]
        return tuple(op(*xs).shape)


def build_graph(model_config: dict | str, weights: Callable[[str], list[np.ndarray]] | None
                = None, keras_version: str = "") -> KerasGraph:
    """The torch graph of a Keras ``model_config``; ``weights(layer_name)`` gives each layer's
    arrays in ``weight_names`` order (None: leave zeros, e.g. to fill from training)."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    if config.get("class_name") not in ("Functional", "Model"):
        raise KerasModelError(f"model class {config.get('class_name')!r}: only Keras "
                              "functional models are supported")
    body = config["config"]
    inputs = [str(i[0]) for i in body.get("input_layers", [])]
    outputs = [str(o[0]) for o in body.get("output_layers", [])]
    if len(inputs) != 1 or not outputs:
        raise KerasModelError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; "
                              "one input and at least one output are supported")
    shapes: dict[str, tuple[int, ...]] = {}
    nodes: list[_Node] = []
    ops: dict[str, _Op] = {}
    input_shape: tuple[int, ...] | None = None
    for layer in body["layers"]:
        cls, name, cfg = layer["class_name"], str(layer["name"]), layer.get("config", {})
        sources = _inbound(layer)
        missing = [s for s in sources if s not in shapes]
        if missing:
            raise KerasModelError(f"layer {name!r} uses {missing} before they are defined")
        if cls == "InputLayer":
            _check_options(cls, name, cfg)
            shape = _batch_shape(cfg)
            if name != inputs[0] or not shape or len(shape) != 4:
                raise KerasModelError(f"input layer {name!r} with shape {shape!r}: one 4-D "
                                      "(N, C, H, W) input is supported")
            input_shape = tuple(int(v) for v in shape[1:])
            shapes[name] = (1, *input_shape)
            nodes.append(_Node(name, cls, ()))
            continue
        in_shapes = [shapes[s] for s in sources]
        op = _build_op(cls, name, cfg, in_shapes)
        if weights is not None:
            op.set_weights(weights(name))
        ops[name] = op
        shapes[name] = _output_shape(op, in_shapes)
        nodes.append(_Node(name, cls, sources))
    if input_shape is None or any(o not in shapes for o in outputs):
        raise KerasModelError("the model's input or output layers are not in its layer list")
    graph = KerasGraph(nodes, ops, inputs[0], outputs, input_shape, keras_version)
    return graph.eval()


def read_layer_weights(group: Any, layer: str) -> list[np.ndarray]:
    """One layer's arrays from an h5 ``model_weights`` group, in ``weight_names`` order."""
    if layer not in group:
        return []
    g = group[layer]
    return [np.asarray(g[_text(w)]) for w in g.attrs.get("weight_names", [])]


def load_keras_h5(path: str | Path, *, device: str | torch.device = "cpu") -> KerasGraph:
    """Build the model stored in a Keras 2 legacy ``.h5`` file (graph + weights), float32.

    The optimizer state and training config in a checkpoint are ignored. Raises
    ``PipelineError(MODEL_UNAVAILABLE)`` for a file that is not such a model, or that uses a
    layer class or option the runner does not support (the message names it).
    """
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise KerasModelError(f"{path.name} is not a readable HDF5 file ({exc}).") from None
    with handle as f:
        if "model_config" not in f.attrs or "model_weights" not in f:
            raise KerasModelError(f"{path.name} is not a full Keras model (.h5 with "
                                  "model_config and model_weights).")
        config = json.loads(_text(f.attrs["model_config"]))
        group = f["model_weights"]
        try:
            graph = build_graph(config, lambda name: read_layer_weights(group, name),
                                _text(f.attrs.get("keras_version", "")))
        except KerasModelError as exc:
            raise KerasModelError(f"{path.name}: {exc.message}") from None
    return graph.to(device)


def layer_weight_items(graph: KerasGraph) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Each layer's weights as Keras would store them: ``[(keras_name, array), ...]``
    (the inverse of loading; used to write ``.h5`` files of models trained here)."""
    keras_names = {"weight": "kernel", "bias": "bias", "gamma": "gamma", "beta": "beta",
                   "moving_mean": "moving_mean", "moving_variance": "moving_variance",
                   "alpha": "alpha"}
    out: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, op in graph.ops.items():
        items = []
        for w in op.weight_names:
            array = getattr(op, w).detach().cpu().numpy()
            if w == "weight":  # torch (out, in, kh, kw) / (in, out, kh, kw) -> Keras
                array = array.transpose(2, 3, 1, 0)
            items.append((keras_names[w], np.ascontiguousarray(array, dtype=np.float32)))
        if items:
            out[name] = items
    return out


def save_keras_h5(graph: KerasGraph, model_config: dict, path: str | Path,
                  keras_version: str = "2.11.0") -> None:
    """Write ``graph``'s weights with ``model_config`` in Keras 2's legacy ``.h5`` layout."""
    import h5py

    weights = layer_weight_items(graph)
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = keras_version
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(model_config)
        group = f.create_group("model_weights")
        names = [str(layer["name"]) for layer in model_config["config"]["layers"]]
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            g = group.create_group(name)
            items = weights.get(name, [])
            g.attrs["weight_names"] = np.array([f"{name}/{k}:0".encode() for k, _ in items])
            for key, array in items:
                g.create_dataset(f"{name}/{key}:0", data=array)


def predict(graph: KerasGraph, net_input: np.ndarray, *, batch_size: int = 8,
            output: int = 0, on_batch: Callable[[int, int], None] | None = None,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Run ``graph`` over ``net_input`` (N, C, H, W) in batches, float32, TF32 off.

    ``reduce`` maps each batch's output on the device (e.g. an argmax) before it is copied
    back, so a 160-slice 512×512 10-class volume never needs 1.7 GB of probabilities in RAM.
    """
    device = next(graph.parameters()).device
    pieces: list[np.ndarray] = []
    n = int(net_input.shape[0])
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=False,
                                                     deterministic=False, allow_tf32=False):
        for start in range(0, n, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(
                net_input[start:start + batch_size], dtype=np.float32)).to(device)
            y = graph(x)
            if isinstance(y, tuple):
                y = y[output]
            if reduce is not None:
                y = reduce(y)
            pieces.append(y.cpu().numpy())
            if on_batch is not None:
                on_batch(min(start + batch_size, n), n)
    return np.concatenate(pieces, axis=0)

