"""Batches without padding embedded without the backbone's forward preamble.

:meth:`~adaptive_depth.backbones.LayerRunner.capture` runs the model's own forward up to its first layer.
That forward's preamble (argument checks, the mask builder, config lookups) costs about 0.1 ms per call
on a CPU, which matters at batch size 1. For a batch without padding, when the capture shows that the
first layer's input depended on the batch only through the embeddings module's call (its tensor
arguments are the caller's own inputs, its output entered the first layer unchanged, and no mask or
other tensor went to the layers), :class:`EmbeddingReplay` records that call, and :class:`ReplayCache`
serves later batches of the same kind with the embeddings module alone: the same layer inputs, bitwise
(``tests/test_embedding_replay.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adaptive_depth.backbones import LayerRunner, get_backbone

__all__ = ["EmbeddingReplay", "ReplayCache", "capture_replayable"]


def capture_replayable(base_model: nn.Module, **model_inputs: Any) -> tuple[LayerRunner, EmbeddingReplay | None]:
    """:meth:`LayerRunner.capture`, also recording the embeddings module's call: the runner, and an
    :class:`EmbeddingReplay` when the runner depends on the inputs only through that call
    (else ``None``). Call it on a batch without padding; the replay serves such batches only.
    """
    embeddings = getattr(base_model, "embeddings", None)
    if not isinstance(embeddings, nn.Module):
        return LayerRunner.capture(base_model, **model_inputs), None
    call: dict[str, Any] = {}

    def record_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call["args"], call["kwargs"] = args, dict(kwargs)

    def record_output(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        call["output"] = output

    handles = (embeddings.register_forward_pre_hook(record_inputs, with_kwargs=True),
               embeddings.register_forward_hook(record_output, with_kwargs=True))
    try:
        runner = LayerRunner.capture(base_model, **model_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return runner, EmbeddingReplay.from_call(call, runner, model_inputs)


_CONSTANT_TYPES = (type(None), bool, int, float, str)


def _as_recipe(value: Any, inputs_by_id: Mapping[int, str]) -> tuple[str, Any] | None:
    """``("input", name)`` for one of the caller's tensors, ``("constant", value)`` for a plain
    value, ``None`` for anything else (a tensor the forward made itself, an object)."""
    if isinstance(value, Tensor):
        name = inputs_by_id.get(id(value))
        return None if name is None else ("input", name)
    return ("constant", value) if isinstance(value, _CONSTANT_TYPES) else None


@dataclass(frozen=True)
class EmbeddingReplay:
    """The embeddings call that fed the first layer, replayable without the model's forward.

    Made by :func:`capture_replayable` only when the capture shows that nothing else
    depended on the batch: the embeddings' tensor arguments were the caller's own input tensors
    (the same objects), the first layer received the embeddings' output itself, and the layer
    mask and every other layer argument were plain values (transformers 5.x gives the layers no
    mask for a batch without padding, sdpa or eager). :meth:`runner` then calls the embeddings
    module with the new batch's tensors in those places: the same call, so the same hidden states,
    for any batch the forward would treat alike (same input names, no padding).

    Attributes:
        args: per positional argument, ``("input", name)`` or ``("constant", value)``.
        kwargs: ``(keyword, recipe)`` pairs, as ``args``.
        layer_mask: the layer mask recorded (a plain value, ``None`` in practice).
        extra_args: the layers' positional arguments after the mask (plain values).
        extra_kwargs: the layers' keyword arguments (plain values).
    """

    args: tuple[tuple[str, Any], ...]
    kwargs: tuple[tuple[str, tuple[str, Any]], ...]
    layer_mask: Any
    extra_args: tuple[Any, ...]
    extra_kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def from_call(cls, call: Mapping[str, Any], runner: LayerRunner,
                  model_inputs: Mapping[str, Any]) -> EmbeddingReplay | None:
        """The replay of a recorded embeddings ``call`` (``args``, ``kwargs``, ``output``), or
        ``None`` when ``runner`` depended on the batch through anything else."""
        if "output" not in call or call["output"] is not runner.hidden_states:
            return None
        if not all(isinstance(value, _CONSTANT_TYPES) for value in
                   (runner.layer_mask, *runner.extra_args, *runner.extra_kwargs.values())):
            return None
        inputs_by_id = {id(value): name for name, value in model_inputs.items() if isinstance(value, Tensor)}
        args = tuple(_as_recipe(value, inputs_by_id) for value in call["args"])
        kwargs = tuple((key, _as_recipe(value, inputs_by_id)) for key, value in call["kwargs"].items())
        if any(recipe is None for recipe in args) or any(recipe is None for _, recipe in kwargs):
            return None
        return cls(args=args, kwargs=kwargs, layer_mask=runner.layer_mask,  # type: ignore[arg-type]
                   extra_args=runner.extra_args, extra_kwargs=tuple(runner.extra_kwargs.items()))

    def runner(self, base_model: nn.Module, **model_inputs: Any) -> LayerRunner:
        """The :class:`LayerRunner` for ``model_inputs`` (a batch like the recorded one: the same
        input names, no padding), from one call of the embeddings module."""

        def value(recipe: tuple[str, Any]) -> Any:
            kind, content = recipe
            return model_inputs[content] if kind == "input" else content

        embeddings = base_model.get_submodule("embeddings")
        hidden_states = embeddings(*(value(recipe) for recipe in self.args),
                                   **{key: value(recipe) for key, recipe in self.kwargs})
        return LayerRunner(base_model=base_model, adapter=get_backbone(base_model.config),
                           hidden_states=hidden_states, layer_mask=self.layer_mask, extra_args=self.extra_args,
                           extra_kwargs=dict(self.extra_kwargs))


class ReplayCache:
    """Per kind of batch without padding, the :class:`EmbeddingReplay` its first capture gave (or
    ``None``: that model cannot replay), and :meth:`runner` that uses it."""

    def __init__(self) -> None:
        self.kinds: dict[tuple, EmbeddingReplay | None] = {}

    def key(self, base_model: nn.Module, token_mask: Tensor, training: bool,
            model_inputs: Mapping[str, Any]) -> tuple | None:
        """What a batch shares with the batches whose embeddings call it may replay: the input names
        and which are ``None``, the mask's dtype, the attention implementation and the training flag.
        ``None`` (capture, do not replay) for a batch with padding, or while a compiler or tracer
        records the call (it must see the forward itself)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return None
        if not bool(token_mask.all()):
            return None
        names = tuple(sorted((name, value is None) for name, value in model_inputs.items()))
        mask = model_inputs.get("attention_mask")
        return names, getattr(mask, "dtype", None), getattr(base_model.config, "_attn_implementation", None), training

    def runner(self, base_model: nn.Module, token_mask: Tensor, training: bool, **model_inputs: Any) -> LayerRunner:
        """The :class:`LayerRunner` of ``model_inputs`` (``attention_mask`` among them; ``token_mask``
        ``[B, N]`` bool): the embeddings call alone for a batch of a kind already captured and
        replayable, else a capture (recording the replay for a new kind)."""
        key = self.key(base_model, token_mask, training, model_inputs)
        replay = None if key is None else self.kinds.get(key)
        if replay is not None:
            return replay.runner(base_model, **model_inputs)
        if key is None or key in self.kinds:  # padding, tracing, or a model that cannot replay
            return LayerRunner.capture(base_model, **model_inputs)
        runner, self.kinds[key] = capture_replayable(base_model, **model_inputs)
        return runner
