"""How a cache unit's output is turned into something cacheable, and rebuilt from the cache when it is skipped.

A block caches its residual per stream (output minus input: the hidden stream, and the text stream of
two-stream blocks), so a skipped block returns its current input plus the cached residual. A sub-block
(attention, cross-attention, FFN) caches its branch output, so a skipped sub-block hands the cached output to
the block's own residual add and gate.
"""

from __future__ import annotations

import torch

from ..models import ENCODER, HIDDEN, OUTPUT, BlockListSpec, UnsupportedModelError, argument_index, get_argument


def stream_shapes(hidden, encoder) -> tuple[tuple[int, ...], ...]:
    """What a cache slot is keyed on: the hidden stream's shape, and the text stream's where the unit gets one.

    Reusing a residual computed for other shapes would fail deep inside tensor code or, where shapes broadcast,
    silently give wrong values; a change is caught instead (a new generation, or ShapeChangedError mid-way).
    """
    shapes = (tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else (),)
    if isinstance(encoder, torch.Tensor):
        shapes += (tuple(encoder.shape),)
    return shapes


class SubBlockUnit:
    """An attention or FFN module: caches its output as is."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self._input_name = "hidden_states"
        self._input_index = argument_index(module, "hidden_states")
        if self._input_index is None:
            self._input_index = 0  # first positional argument, e.g. FeedForward(x)
        self._encoder_index = argument_index(module, "encoder_hidden_states")
        self._bare = True

    def input_tensor(self, args: tuple, kwargs: dict):
        return get_argument(args, kwargs, self._input_name, self._input_index)

    def input_shapes(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], ...]:
        """Shapes of the streams the output depends on: a joint attention's output has the text length too."""
        encoder = get_argument(args, kwargs, "encoder_hidden_states", self._encoder_index)
        return stream_shapes(self.input_tensor(args, kwargs), encoder)

    def extract(self, args: tuple, kwargs: dict, output) -> tuple:
        self._bare = isinstance(output, torch.Tensor)
        return (output,) if self._bare else tuple(output)

    def rebuild(self, args: tuple, kwargs: dict, tensors: tuple):
        return tensors[0] if self._bare else tensors

    def primary(self, tensors: tuple) -> torch.Tensor:
        return next(t for t in tensors if isinstance(t, torch.Tensor))


class BlockUnit:
    """A transformer block: caches the residual of each stream it returns."""

    def __init__(self, name: str, module: torch.nn.Module, spec: BlockListSpec) -> None:
        self.name = name
        self.spec = spec
        self._hidden_index = argument_index(module, spec.hidden_arg)
        self._encoder_index = argument_index(module, spec.encoder_arg)
        self._bare = len(spec.returns) == 1
        self._block_class = type(module).__name__

    def input_tensor(self, args: tuple, kwargs: dict):
        return get_argument(args, kwargs, self.spec.hidden_arg, self._hidden_index)

    def input_shapes(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], ...]:
        """Shapes of both streams: a cached text residual only fits text of the length it was computed for."""
        inputs = self._inputs(args, kwargs)
        return stream_shapes(inputs[HIDDEN], inputs[ENCODER])

    def _inputs(self, args: tuple, kwargs: dict) -> dict:
        return {
            HIDDEN: self.input_tensor(args, kwargs),
            ENCODER: get_argument(args, kwargs, self.spec.encoder_arg, self._encoder_index),
        }

    def extract(self, args: tuple, kwargs: dict, output) -> tuple:
        inputs = self._inputs(args, kwargs)
        self._bare = isinstance(output, torch.Tensor)
        outputs = (output,) if self._bare else tuple(output)
        roles = (HIDDEN,) if self._bare else self.spec.returns
        if len(outputs) != len(roles):
            raise UnsupportedModelError(
                f"{self._block_class} at `{self.name}` returned {len(outputs)} values; the adapter table expects "
                f"{len(roles)} ({', '.join(roles)}). Update its entry in diffusers_block.models.FAMILIES."
            )
        residuals = []
        for role, out in zip(roles, outputs):
            if role == OUTPUT:
                residuals.append(out)
                continue
            inp = inputs[role]
            if out is None or inp is None:
                residuals.append(None)
                continue
            if out.shape != inp.shape:
                raise UnsupportedModelError(
                    f"{self._block_class} at `{self.name}` returned its {role} stream with shape {tuple(out.shape)} "
                    f"for an input of shape {tuple(inp.shape)}; block caching needs shape-preserving blocks."
                )
            residuals.append(out - inp)
        return tuple(residuals)

    def rebuild(self, args: tuple, kwargs: dict, residuals: tuple):
        inputs = self._inputs(args, kwargs)
        if self._bare:
            return inputs[HIDDEN] + residuals[0]
        return tuple(
            residual if residual is None or role == OUTPUT else inputs[role] + residual
            for role, residual in zip(self.spec.returns, residuals)
        )

    def primary(self, residuals: tuple) -> torch.Tensor:
        return residuals[0] if self._bare else residuals[self.spec.returns.index(HIDDEN)]
