"""Capture the residual stream after chosen decoder layers, and stop the forward there.

"Layer L" is the output of decoder layer L (0-based): the same tensor as sparsify's hookpoint
``model.layers.L`` and as HF's ``output_hidden_states=True`` ``hidden_states[L + 1]`` — except for
the very last layer, where HF replaces ``hidden_states[-1]`` with the final-norm output.

Usage::

    with capture_residual(model, [4, 8]) as cap:
        model(**inputs)          # stops right after layer 8; layers 9.. and the LM head never run
    cap.outputs[4], cap.outputs[8]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    """Raised from the hook of the deepest requested layer; swallowed by :class:`ResidualCapture`."""


class DecoderLayersNotFound(RuntimeError):
    pass


def _num_text_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "num_hidden_layers", None)
        if isinstance(n, int):
            return n
    return None


def _layers_of(module: Any) -> nn.ModuleList | None:
    layers = getattr(module, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's list of decoder layers, found without assuming one attribute path.

    Tries ``get_decoder()``, then ``language_model`` / ``model.language_model`` / ``model``, then
    every ``nn.ModuleList`` named ``layers`` outside a vision tower whose length matches the text
    config's ``num_hidden_layers``.
    """
    expected = _num_text_layers(model)
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except Exception:  # noqa: BLE001 - some models raise instead of returning None
            pass
    inner = getattr(model, "model", None)
    candidates += [
        getattr(model, "language_model", None),
        getattr(inner, "language_model", None),
        getattr(getattr(model, "language_model", None), "model", None),
        inner,
    ]
    for cand in candidates:
        layers = _layers_of(cand) if cand is not None else None
        if layers is not None and (expected is None or len(layers) == expected):
            return layers

    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
    ]
    textual = [
        (n, m) for n, m in found
        if "vision" not in n and "visual" not in n and (expected is None or len(m) == expected)
    ]
    if len(textual) == 1:
        return textual[0][1]
    listing = ", ".join(f"{n} ({len(m)})" for n, m in found) or "none"
    raise DecoderLayersNotFound(
        f"cannot find the language model's decoder layers in {type(model).__name__} "
        f"(expected {expected} layers); ModuleList candidates: {listing}"
    )


class ResidualCapture:
    """Forward hooks on chosen decoder layers; see the module docstring."""

    def __init__(self, model: nn.Module, layers: list[int], stop: bool = True) -> None:
        if not layers:
            raise ValueError("layers: at least one layer is required")
        self.decoder_layers = find_decoder_layers(model)
        n = len(self.decoder_layers)
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers: {bad} out of range; the model has {n} decoder layers (0..{n - 1})")
        self.layers = sorted(set(layers))
        self.deepest = self.layers[-1]
        self.stop = stop
        self.outputs: dict[int, torch.Tensor] = {}
        self.stopped = False
        self._handles: list[Any] = []

    def _hook(self, layer: int) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(hidden, torch.Tensor):  # e.g. a ModelOutput
                hidden = hidden[0]
            # later layers could modify their input in place; the deepest one is never followed
            self.outputs[layer] = hidden.detach() if layer == self.deepest else hidden.detach().clone()
            if self.stop and layer == self.deepest:
                self.stopped = True
                raise _StopForward

        return hook

    def __enter__(self) -> "ResidualCapture":
        self.outputs = {}
        self.stopped = False
        try:
            for layer in self.layers:
                self._handles.append(self.decoder_layers[layer].register_forward_hook(self._hook(layer)))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return exc_type is not None and issubclass(exc_type, _StopForward)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[int, torch.Tensor]:
        """Call ``fn`` (a forward) with the hooks in place; returns ``{layer: hidden states}``."""
        with self:
            fn(*args, **kwargs)
        missing = [layer for layer in self.layers if layer not in self.outputs]
        if missing:
            raise RuntimeError(f"the forward never reached decoder layers {missing}")
        return self.outputs


def capture_residual(model: nn.Module, layers: list[int], stop: bool = True) -> ResidualCapture:
    """Context manager: record the output of decoder ``layers``; stop after the deepest if ``stop``."""
    return ResidualCapture(model, layers, stop=stop)
