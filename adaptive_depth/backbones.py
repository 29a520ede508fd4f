"""Where each Hugging Face encoder family keeps its layers and how to drive them one by one.

Everything architecture-specific lives in :data:`BACKBONES`, keyed by ``config.model_type``.
The rest of the library only asks an adapter for "the module that runs step ``i``".

How layers are called: rather than rebuilding each family's embeddings and attention mask
(which changed shape and type between transformers 4.x and 5.x), the model's own forward runs
up to its first layer, where a pre-hook records the hidden states, the mask and the extra
arguments exactly as the installed version builds them, and stops the forward there. Then
:class:`LayerRunner` calls the layers itself with those arguments. This matched the models'
own forward exactly for every family here (see ``tests/test_encoder.py``); a batch without padding
can skip the forward (:mod:`adaptive_depth.embedding_replay`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "EncoderDims",
    "LayerRunner",
    "UnsupportedModelError",
    "get_backbone",
]


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`BACKBONES`."""


@dataclass(frozen=True)
class EncoderDims:
    """The sizes of an encoder that its MAC count depends on (see :mod:`adaptive_depth.flops`).

    Attributes:
        hidden_size: ``H``.
        intermediate_size: ``I``, the feed-forward width.
        num_attention_heads: heads per layer (the MAC count does not depend on it).
        num_layers: ``L``, layer applications ("steps") in a full forward; for ALBERT the
            number of steps, not of distinct weight sets.
        embedding_size: ``E`` when a Linear ``E -> H`` projects the embeddings (ALBERT
            always, ELECTRA when ``E != H``), else ``None``.
        has_pooler: the base model runs a ``Linear(H -> H)`` pooler on ``[CLS]``.
        layers_per_step: transformer layers applied per step (ALBERT's ``inner_group_num``;
            1 elsewhere).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_layers: int
    embedding_size: int | None
    has_pooler: bool
    layers_per_step: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_layers", "layers_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.embedding_size is not None and self.embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1 or None, got {self.embedding_size}.")


def _bert_dims(config: Any, has_pooler: bool = True) -> EncoderDims:
    """BERT-style configs (``hidden_size``, ``intermediate_size``...), no embedding projection."""
    return EncoderDims(
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_attention_heads=int(config.num_attention_heads),
        num_layers=int(config.num_hidden_layers),
        embedding_size=None,
        has_pooler=has_pooler,
    )


def _electra_dims(config: Any) -> EncoderDims:
    # ElectraModel has no pooler; it projects the embeddings when embedding_size != hidden_size.
    dims = _bert_dims(config, has_pooler=False)
    embedding_size = int(config.embedding_size)
    return replace(dims, embedding_size=embedding_size if embedding_size != dims.hidden_size else None)


def _albert_dims(config: Any) -> EncoderDims:
    # embedding_hidden_mapping_in always exists; each step runs inner_group_num layers.
    return replace(_bert_dims(config), embedding_size=int(config.embedding_size),
                   layers_per_step=int(config.inner_group_num))


def _distilbert_dims(config: Any) -> EncoderDims:
    return EncoderDims(hidden_size=int(config.dim), intermediate_size=int(config.hidden_dim),
                       num_attention_heads=int(config.n_heads), num_layers=int(config.n_layers),
                       embedding_size=None, has_pooler=False)


@dataclass(frozen=True)
class BackboneAdapter:
    """How one encoder family is laid out.

    Attributes:
        model_type: the ``config.model_type`` this entry serves.
        layers_path: dotted path, from the base model, of the ``nn.ModuleList`` of layers.
        dims: ``config -> EncoderDims``, the sizes the FLOPs count needs.
        shared_layers: ALBERT-style weight sharing: ``num_hidden_layers`` steps run over
            ``num_hidden_groups`` modules; gates and heads are indexed by step.
        batched_extra_args: positions (among the layer's arguments after the mask) of tensors
            with a batch dimension, which must follow the rows when a batch is compacted
            (MPNet's relative position bias ``[B, heads, N, N]``).
        positions_after_padding: position ids start after the padding index (RoBERTa and
            MPNet), so the position table holds ``padding index + 1`` fewer tokens.
        padding_index: the padding index the embeddings use whatever the config says (MPNet's is 1);
            ``None``: ``config.pad_token_id``.
    """

    model_type: str
    layers_path: str
    dims: Callable[[Any], EncoderDims] = _bert_dims
    shared_layers: bool = False
    batched_extra_args: tuple[int, ...] = ()
    positions_after_padding: bool = False
    padding_index: int | None = None

    def max_tokens(self, config: Any) -> int | None:
        """The longest input the position table embeds (``None``: no absolute positions)."""
        positions = getattr(config, "max_position_embeddings", None)
        if not isinstance(positions, int):
            return None
        if self.positions_after_padding:
            padding = self.padding_index if self.padding_index is not None else getattr(config, "pad_token_id", None)
            positions -= int(padding or 0) + 1
        return positions

    def layer_list(self, base_model: nn.Module) -> nn.ModuleList:
        """The ``nn.ModuleList`` that holds the layers (or ALBERT's layer groups)."""
        return base_model.get_submodule(self.layers_path)  # type: ignore[return-value]

    def num_steps(self, config: Any) -> int:
        """How many layer applications a full forward makes."""
        return int(config.num_hidden_layers)

    def module_index(self, config: Any, step: int) -> int:
        """Index into :meth:`layer_list` of the module that runs ``step`` (0-based)."""
        if not self.shared_layers:
            return step
        steps, groups = int(config.num_hidden_layers), int(config.num_hidden_groups)
        return int(step / (steps / groups))  # the expression AlbertTransformer uses


BACKBONES: Mapping[str, BackboneAdapter] = {
    "bert": BackboneAdapter("bert", "encoder.layer"),
    "roberta": BackboneAdapter("roberta", "encoder.layer", positions_after_padding=True),
    # xlm-roberta and camembert: the RoBERTa architecture.
    "xlm-roberta": BackboneAdapter("xlm-roberta", "encoder.layer", positions_after_padding=True),
    "camembert": BackboneAdapter("camembert", "encoder.layer", positions_after_padding=True),
    "electra": BackboneAdapter("electra", "encoder.layer", _electra_dims),
    "distilbert": BackboneAdapter("distilbert", "transformer.layer", _distilbert_dims),
    "albert": BackboneAdapter("albert", "encoder.albert_layer_groups", _albert_dims, shared_layers=True),
    # Every MPNet layer takes the relative position bias the encoder computes once per batch.
    "mpnet": BackboneAdapter("mpnet", "encoder.layer", batched_extra_args=(0,), positions_after_padding=True,
                             padding_index=1),  # MPNetEmbeddings hard-codes padding_idx = 1
}


def get_backbone(config: Any) -> BackboneAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the supported model types, or a decoder configuration.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in BACKBONES:
        supported = ", ".join(sorted(BACKBONES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by adaptive_depth; supported: {supported}."
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(
            f"this {model_type} is configured as a decoder (is_decoder / add_cross_attention): adaptive_depth runs "
            "bidirectional encoders (gates and heads read [CLS], rows leave a batch and their masks are rebuilt "
            "without a causal part); load it with is_decoder=False."
        )
    return BACKBONES[model_type]


class _FirstLayerReached(Exception):
    """Raised by the capture hook to stop the model's forward at its first layer."""


@dataclass
class LayerRunner:
    """Calls one encoder's layers by hand with the arguments its own forward built.

    Build with :meth:`capture`. ``hidden_states`` is what enters the first layer (after the
    embeddings and any embedding projection); ``layer_mask`` is the attention mask in the
    form the installed transformers passes to a layer (``None``, a bool or additive float
    ``[B, 1, Q, K]`` tensor).

    Attributes:
        hidden_states: ``[B, N, H]`` input of the first layer.
        layer_mask: the layer-level attention mask (see above), or ``None``.
        extra_args: positional arguments after the mask.
        extra_kwargs: keyword arguments the model passes to every layer.
    """

    base_model: nn.Module
    adapter: BackboneAdapter
    hidden_states: Tensor
    layer_mask: Any
    extra_args: tuple[Any, ...]
    extra_kwargs: dict[str, Any]

    @classmethod
    def capture(cls, base_model: nn.Module, **model_inputs: Any) -> LayerRunner:
        """Run ``base_model(**model_inputs)`` up to its first layer and record that call."""
        adapter = get_backbone(base_model.config)
        first_layer = adapter.layer_list(base_model)[0]
        recorded: dict[str, Any] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            recorded["args"], recorded["kwargs"] = args, dict(kwargs)
            raise _FirstLayerReached

        handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            base_model(**model_inputs)
        except _FirstLayerReached:
            pass
        finally:
            handle.remove()
        if "args" not in recorded:
            raise RuntimeError(
                f"{type(base_model).__name__} finished its forward without calling its first "
                f"layer ({adapter.layers_path}[0]); cannot drive its layers."
            )
        args = recorded["args"]
        hidden_states = args[0] if args else recorded["kwargs"].pop("hidden_states")
        layer_mask = args[1] if len(args) > 1 else recorded["kwargs"].pop("attention_mask", None)
        return cls(
            base_model=base_model,
            adapter=adapter,
            hidden_states=hidden_states,
            layer_mask=layer_mask,
            extra_args=tuple(args[2:]),
            extra_kwargs=recorded["kwargs"],
        )

    @property
    def num_steps(self) -> int:
        """How many layer applications a full forward makes."""
        return self.adapter.num_steps(self.base_model.config)

    def layer(self, step: int) -> nn.Module:
        """The module that runs ``step`` (shared between steps for ALBERT)."""
        index = self.adapter.module_index(self.base_model.config, step)
        return self.adapter.layer_list(self.base_model)[index]

    def select_rows(self, rows: Tensor) -> LayerRunner:
        """A runner for a subset of the batch: the layer mask keeps only ``rows``.

        Args:
            rows: ``[R]`` long indices into the batch dimension.
        """
        mask = self.layer_mask
        if isinstance(mask, Tensor):
            if mask.shape[0] != 1:
                mask = mask.index_select(0, rows)
        elif mask is not None:
            raise NotImplementedError(
                f"cannot select rows of a {type(mask).__name__} attention mask; load the model "
                "with attn_implementation='sdpa' or 'eager'."
            )
        extra_args = self.extra_args
        if self.adapter.batched_extra_args:
            extra_args = tuple(
                arg.index_select(0, rows) if index in self.adapter.batched_extra_args and arg.shape[0] != 1 else arg
                for index, arg in enumerate(extra_args)
            )
        return LayerRunner(
            base_model=self.base_model,
            adapter=self.adapter,
            hidden_states=self.hidden_states.index_select(0, rows),
            layer_mask=mask,
            extra_args=extra_args,
            extra_kwargs=self.extra_kwargs,
        )

    def trim(self, length: int, padded: bool) -> LayerRunner:
        """A runner for the first ``length`` positions of its rows (whose tokens all lie within them).

        Args:
            length: positions kept, at most the current length.
            padded: whether some of the rows still end before ``length``; if not, the layers run
                without a mask, as transformers runs a batch without padding.

        Raises:
            NotImplementedError: a batched layer argument that is not a ``[..., N, N]`` position bias.
        """
        mask = self.layer_mask
        if isinstance(mask, Tensor) and padded:
            mask = mask[..., :length, :length] if mask.shape[-2] > 1 else mask[..., :length]
        elif not padded:
            mask = None
        elif mask is not None:
            raise NotImplementedError(
                f"cannot cut a {type(mask).__name__} attention mask; load the model with "
                "attn_implementation='sdpa' or 'eager'."
            )
        extra_args = list(self.extra_args)
        for index in self.adapter.batched_extra_args:
            arg, num_tokens = extra_args[index], self.hidden_states.shape[1]
            if not (isinstance(arg, Tensor) and arg.ndim >= 2 and tuple(arg.shape[-2:]) == (num_tokens, num_tokens)):
                raise NotImplementedError(
                    f"cannot cut {self.adapter.model_type} layer argument {index + 2} "
                    f"({type(arg).__name__} {tuple(getattr(arg, 'shape', ()))}) to {length} positions."
                )
            extra_args[index] = arg[..., :length, :length]
        return LayerRunner(
            base_model=self.base_model,
            adapter=self.adapter,
            hidden_states=self.hidden_states[:, :length],
            layer_mask=mask,
            extra_args=tuple(extra_args),
            extra_kwargs=self.extra_kwargs,
        )

    def run_layer(self, step: int, hidden_states: Tensor) -> Tensor:
        """Apply layer ``step`` to ``hidden_states`` ``[B', N, H]`` (rows matching the mask)."""
        output = self.layer(step)(hidden_states, self.layer_mask, *self.extra_args, **self.extra_kwargs)
        # transformers 4.x layers return tuples; 5.x layers return the tensor itself.
        return output[0] if isinstance(output, tuple) else output

    def run_all(self) -> Tensor:
        """All layers in order from :attr:`hidden_states`: the plain model's last hidden state."""
        hidden_states = self.hidden_states
        for step in range(self.num_steps):
            hidden_states = self.run_layer(step, hidden_states)
        return hidden_states
