"""Layer tables in the seed's (torchsummary) format, and architecture checks.

``layer_table(model)`` runs the model once, in eval mode, on a dummy CPU input and records one
row per leaf-module call, in call order, named ``"<Type>-<index>"`` exactly as torchsummary
does (the index counts every leaf call, 1-based). ``format_table`` prints those rows in the
seed's text format, byte for byte (trailing spaces aside)::

    ----------------------------------------------------------------
            Layer (type)               Output Shape         Param #
    ================================================================
                Conv2d-1            [-1, 4, 28, 28]              36
    ...
    ================================================================
    Total params: 18,214
    Trainable params: 18,214
    Non-trainable params: 0
    ----------------------------------------------------------------

``architecture_checks(model)`` counts the BatchNorm, dropout (``nn.Dropout`` *and*
``nn.Dropout2d``: the seed's checker missed Dropout2d), Linear and global-pooling layers that
the forward pass uses, and computes the theoretical receptive field.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .models import count_parameters, create_model

__all__ = [
    "LayerRow",
    "layer_table",
    "format_table",
    "architecture_checks",
    "format_checks",
]

_DASHES = "-" * 64
_EQUALS = "=" * 64
_ROW = "{:>20}  {:>25} {:>15}"

@dataclass(frozen=True)
class LayerRow:
    """One row of the layer table.

    ``output_shape`` is ``(-1, C, H, W)`` style (batch dimension shown as -1), or a tuple of
    such tuples for a module that returns several tensors. ``trainable`` is the number of
    parameters of ``params`` that require grad (None means all of them).
    """

    name: str  # "Conv2d-1"
    type: str  # "Conv2d"
    output_shape: tuple  # (-1, 4, 28, 28)
    params: int  # 36
    trainable: Optional[int] = None

    @property
    def trainable_params(self) -> int:
        return self.params if self.trainable is None else self.trainable


# ----------------------------------------------------------------------------- tracing


@dataclass
class _Call:
    module: nn.Module
    input_shape: Optional[Tuple[int, ...]]
    output_shape: tuple


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _shape_of(output) -> tuple:
    if isinstance(output, torch.Tensor):
        return (-1,) + tuple(output.shape[1:])
    if isinstance(output, (list, tuple)):
        return tuple(_shape_of(o) for o in output)
    return ()


def _trace(model: nn.Module, input_size: Sequence[int]) -> List[_Call]:
    """Run ``model`` once in eval mode on a dummy CPU batch of 2; record every leaf call.

    A model that lives on another device is copied to the CPU (the original is untouched).
    The training/eval mode of every module is restored afterwards.
    """
    if any(p.device.type != "cpu" for p in model.parameters()) or any(
        b.device.type != "cpu" for b in model.buffers()
    ):
        model = copy.deepcopy(model).cpu()
    calls: List[_Call] = []

    def hook(module, inputs, output):
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        calls.append(
            _Call(module, None if first is None else tuple(first.shape), _shape_of(output))
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_leaf(m) and m is not model]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        with torch.no_grad():
            model(torch.zeros(2, *input_size, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:  # restore every module's own mode (mixed modes survive)
            m.training = training
    return calls


def _module_params(module: nn.Module) -> Tuple[int, int]:
    params = list(module.parameters(recurse=False))
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------- layer table


def layer_table(model: Union[nn.Module, str], input_size: Sequence[int] = (1, 28, 28)) -> List[LayerRow]:
    """The seed-style layer table of ``model`` (a module, or a registered model name).

    One :class:`LayerRow` per leaf-module call in call order; a module called twice gives two
    rows (as in torchsummary). Params of a row are the module's own parameters.
    """
    if isinstance(model, str):
        model = create_model(model)
    rows = []
    for index, call in enumerate(_trace(model, input_size), start=1):
        kind = type(call.module).__name__
        params, trainable = _module_params(call.module)
        rows.append(LayerRow(f"{kind}-{index}", kind, call.output_shape, params, trainable))
    return rows


def _shape_str(shape: tuple) -> str:
    if shape and isinstance(shape[0], tuple):
        return str([list(s) for s in shape])
    return str(list(shape))


def _numel(shape: tuple) -> int:
    if shape and isinstance(shape[0], tuple):
        return sum(_numel(s) for s in shape)
    n = 1
    for d in shape:
        n *= abs(d)
    return n


def format_table(
    model_or_rows: Union[nn.Module, str, Iterable[LayerRow]],
    input_size: Sequence[int] = (1, 28, 28),
    sizes: bool = False,
) -> str:
    """The layer table as text, in the seed's torchsummary format (no trailing newline).

    ``model_or_rows``: a module, a registered model name, or rows from :func:`layer_table`.
    ``sizes=True`` appends torchsummary's memory estimate (Input size / Forward/backward pass
    size / Params size / Estimated Total Size, in MB) as the seed's logs show it.
    """
    if isinstance(model_or_rows, (nn.Module, str)):
        rows = layer_table(model_or_rows, input_size)
    else:
        rows = list(model_or_rows)
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable_params for r in rows)
    lines = [_DASHES, _ROW.format("Layer (type)", "Output Shape", "Param #"), _EQUALS]
    for r in rows:
        lines.append(_ROW.format(r.name, _shape_str(r.output_shape), "{0:,}".format(r.params)))
    lines += [
        _EQUALS,
        "Total params: {0:,}".format(total),
        "Trainable params: {0:,}".format(trainable),
        "Non-trainable params: {0:,}".format(total - trainable),
        _DASHES,
    ]
    if sizes:
        mb = 1024.0**2
        input_mb = _numel(tuple(input_size)) * 4.0 / mb
        output_mb = 2.0 * sum(_numel(r.output_shape) for r in rows) * 4.0 / mb  # x2: gradients
        params_mb = total * 4.0 / mb
        lines += [
            "Input size (MB): %0.2f" % input_mb,
            "Forward/backward pass size (MB): %0.2f" % output_mb,
            "Params size (MB): %0.2f" % params_mb,
            "Estimated Total Size (MB): %0.2f" % (input_mb + output_mb + params_mb),
            _DASHES,
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- architecture checks

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
_DROPOUT = (nn.modules.dropout._DropoutNd,)  # Dropout, Dropout1d/2d/3d, AlphaDropout, ...
_CONV = (nn.modules.conv._ConvNd,)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _per_dim(value, n: int) -> Tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * n


def _spatial(shape: Optional[tuple]) -> Optional[Tuple[int, ...]]:
    """Spatial dims of an (N, C, *spatial) tensor shape; None for (N, features)."""
    if shape is None or not shape or isinstance(shape[0], tuple) or len(shape) < 3:
        return None
    return tuple(abs(d) for d in shape[2:])


def _is_global_pool(call: _Call) -> bool:
    """Whether a pooling call has one window that covers its whole input map.

    AdaptiveAvg/MaxPool: global when every output spatial size is 1.
    AvgPool/MaxPool: global when, in every spatial dimension, the kernel reaches from the
    first padded position past the last input position (``kernel >= size + padding``), so the
    one window sees every input position (e.g. the seed's AvgPool2d(5) on a 5x5 map; an
    AvgPool2d(5) on a 7x7 map is *not* global).
    """
    module, in_hw = call.module, _spatial(call.input_shape)
    if in_hw is None:
        return False
    if isinstance(module, _ADAPTIVE):
        out = _spatial(call.output_shape)
        return out is not None and all(d == 1 for d in out)
    if isinstance(module, _POOL):
        n = len(in_hw)
        k = _per_dim(module.kernel_size, n)
        p = _per_dim(module.padding, n)
        d = _per_dim(getattr(module, "dilation", 1), n)
        return all(di * (ki - 1) + 1 >= size + pi for ki, pi, di, size in zip(k, p, d, in_hw))
    return False


def _receptive_field(calls: List[_Call], input_size: Sequence[int]) -> int:
    """Theoretical receptive field (pixels, largest spatial dimension) of one output unit.

    Walks the leaf calls in order with the standard recurrence, per spatial dimension:
    ``k_eff = dilation*(k-1)+1; r += (k_eff-1)*j; j *= stride`` (r=1, j=1 at the input) for
    every Conv and Max/Avg pool. Padding does not change the size of the field (it only
    shifts the window). A global pooling layer (see :func:`_is_global_pool`) and the
    Adaptive pools use a window as large as their input map, so every output unit sees the
    whole input; a Linear on a flattened map with spatial extent does the same. Other layers
    (BatchNorm, ReLU, Dropout, Flatten) leave r and j unchanged. Because of zero padding the
    result can exceed the input size (48 > 28 for v0).
    """
    n = max(len(input_size) - 1, 1)
    r, j = [1] * n, [1] * n
    last_map: Optional[Tuple[int, ...]] = tuple(input_size[1:]) or None

    def apply(k: Sequence[int], s: Sequence[int]) -> None:
        for i in range(n):
            r[i] += (k[i] - 1) * j[i]
            j[i] *= s[i]

    for call in calls:
        m, in_hw = call.module, _spatial(call.input_shape)
        if isinstance(m, _CONV) or isinstance(m, _POOL):
            k, s = _per_dim(m.kernel_size, n), _per_dim(m.stride, n)
            d = _per_dim(getattr(m, "dilation", 1), n)
            apply([di * (ki - 1) + 1 for ki, di in zip(k, d)], s)
        elif isinstance(m, _ADAPTIVE) and in_hw is not None:
            out = _spatial(call.output_shape) or (1,) * n
            # window ceil(in/out), step floor(in/out): exact for divisible sizes and for output 1
            apply([-(-a // b) for a, b in zip(in_hw, out)], [max(a // b, 1) for a, b in zip(in_hw, out)])
        elif isinstance(m, nn.Linear) and last_map is not None and any(d > 1 for d in last_map):
            apply(list(last_map), list(last_map))  # a dense layer sees the whole flattened map
        out_hw = _spatial(call.output_shape)
        if out_hw is not None:
            last_map = out_hw
        elif isinstance(m, nn.Linear):
            last_map = None  # already global
    return max(r)


def architecture_checks(model: Union[nn.Module, str], input_size: Sequence[int] = (1, 28, 28)) -> dict:
    """Counts of the layers the forward pass uses, the receptive field and the parameter count.

    Returns ``{"batchnorm", "dropout", "linear", "global_pooling", "receptive_field",
    "params"}``. Each layer is counted once even if called several times. ``dropout`` counts
    every ``nn.Dropout*`` (Dropout, Dropout2d, ...). ``global_pooling`` counts pooling layers
    whose single window covers their whole input map (AdaptiveAvgPool2d(1), or an AvgPool2d
    whose kernel covers the remaining map).
    """
    if isinstance(model, str):
        model = create_model(model)
    calls = _trace(model, input_size)
    seen, unique = set(), []
    for call in calls:
        if id(call.module) not in seen:
            seen.add(id(call.module))
            unique.append(call)

    def count(kinds) -> int:
        return sum(isinstance(c.module, kinds) for c in unique)

    return {
        "batchnorm": count(_BATCHNORM),
        "dropout": count(_DROPOUT),
        "linear": count((nn.Linear,)),
        "global_pooling": sum(_is_global_pool(c) for c in unique),
        "receptive_field": _receptive_field(calls, input_size),
        "params": count_parameters(model),
    }


def format_checks(model: Union[nn.Module, str], input_size: Sequence[int] = (1, 28, 28)) -> str:
    """:func:`architecture_checks` as readable text (no trailing newline)."""
    if isinstance(model, str):
        model = create_model(model)
    c = architecture_checks(model, input_size)
    name = getattr(model, "model_name", "") or type(model).__name__
    spatial = tuple(input_size[1:])
    size = "x".join(str(d) for d in spatial)
    covers = "covers" if all(c["receptive_field"] >= d for d in spatial) else "does not cover"
    dropout_rates = sorted({m.p for m in model.modules() if isinstance(m, _DROPOUT)})
    rates = f" (p={', '.join(f'{p:g}' for p in dropout_rates)})" if dropout_rates else ""
    lines = [
        f"--- Architecture checks: {name} ---",
        f"Total parameters:                   {c['params']:,}",
        f"BatchNorm layers:                   {c['batchnorm']}",
        f"Dropout layers (incl. Dropout2d):   {c['dropout']}{rates}",
        f"Linear (fully connected) layers:    {c['linear']}",
        f"Global pooling layers:              {c['global_pooling']}",
        f"Receptive field:                    {c['receptive_field']} px "
        f"({covers} the {size} input)",
    ]
    return "\n".join(lines)
