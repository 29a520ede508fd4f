"""``AdaptiveEncoder``: one skip gate and one exit head per layer of any supported HF encoder.

The wrapped model's modules and state-dict keys are left untouched: the encoder drives the
model's own layers (see :mod:`adaptive_depth.backbones`), and :meth:`AdaptiveEncoder.unwrap`
gives the original model back. This module holds the *training* forward (every layer runs,
gates mix as in paper eq. 1); :mod:`adaptive_depth.engine` holds the inference path that
actually skips and exits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from adaptive_depth.backbones import BackboneAdapter, LayerRunner, get_backbone
from adaptive_depth.classifiers import (check_last_head, classifier_exit_head, classifier_label_names, classifier_name,
                                         is_attached, load_classifier)
from adaptive_depth.config import AdaptiveEncoderConfig, check_gate_threshold
from adaptive_depth.embedding_replay import ReplayCache
from adaptive_depth.exits import ExitHead, PoolerExitHead
from adaptive_depth.gates import GatePooling, SkipGate, straight_through_hard
from adaptive_depth.inputs import check_batch, check_input_names, forced_gate_values, selected_head_steps

__all__ = ["AdaptiveEncoder", "AdaptiveEncoderOutput", "GateMode", "HeadSelection"]

GateMode = Literal["soft", "hard", "run", "skip"]
HeadSelection = Literal["all", "last", "intermediate", "none"]
HeadType = Literal["attention", "pooler"]


@dataclass
class AdaptiveEncoderOutput:
    """Output of :meth:`AdaptiveEncoder.forward` (``L`` steps, batch ``B``, ``N`` tokens).

    Attributes:
        exit_logits: ``L`` entries, ``[B, C]`` logits of head ``i`` or ``None`` where head
            ``i`` was not asked for.
        gate_probs: ``[B, L]`` soft skip probabilities ``p_skip`` of every gate.
        gate_values: ``[B, L]`` the values the layers were mixed with (soft, hard 0/1 with the
            straight-through gradient, or forced).
        hidden_states: ``L + 1`` tensors ``[B, N, H]``: ``X^0`` (input of the first layer)
            to ``X^L`` (the paper's notation).
        head_token_states: ``L`` entries, ``[B, N, d]`` self-attention outputs of head ``i``
            (the stage-2 contrastive features), or ``None`` where not asked for.
        attention_mask: ``[B, N]`` bool, True for real tokens.
    """

    exit_logits: list[Tensor | None]
    gate_probs: Tensor
    gate_values: Tensor
    hidden_states: list[Tensor]
    head_token_states: list[Tensor | None]
    attention_mask: Tensor

    @property
    def last_hidden_state(self) -> Tensor:
        """``[B, N, H]`` output of the last step, ``X^L``."""
        return self.hidden_states[-1]

    @property
    def logits(self) -> Tensor:
        """``[B, C]`` logits of the last head (the model's answer at full depth)."""
        last = self.exit_logits[-1]
        if last is None:
            raise ValueError("the last exit head did not run; call forward with heads='all' or 'last'.")
        return last


class AdaptiveEncoder(nn.Module):
    """Wraps a Hugging Face encoder with one :class:`SkipGate` and one :class:`ExitHead` per layer.

    Supports every ``config.model_type`` of :data:`~adaptive_depth.backbones.BACKBONES` (ALBERT: gates
    and heads per step, the layers shared). A base model (``BertModel``) or a task model
    (``BertForSequenceClassification``): only its base model's embeddings and layers are used.

    Args:
        model: a loaded ``transformers.PreTrainedModel`` of a supported family.
        num_labels: classes per exit head (1 for regression). Defaults to
            ``model.config.num_labels``; must equal it when ``model`` is a task model.
        gate_inner_size, gate_num_heads, gate_pooling: :class:`SkipGate` options.
        head_inner_size, head_num_heads: :class:`ExitHead` options.
        dropout: attention-probability dropout in gates and heads.
        initial_skip_bias: initial bias of every gate's score (0.0: ``p_skip`` near 0.5).
        head_type: ``"attention"`` (:class:`ExitHead`, SmartBERT/FastBERT) or ``"pooler"``
            (:class:`PoolerExitHead`, DeeBERT/PABEE).
        with_gates: ``False`` builds no gates (early-exit-only methods); then only
            ``gate_mode="run"`` is available.
        last_head: ``"exit_head"``, or ``"classifier:<model_type>"``: the last exit is the
            fine-tuned ``model``'s own classifier (use :meth:`from_classifier`).

    Attributes:
        adaptive_config: an :class:`~adaptive_depth.AdaptiveEncoderConfig` of the arguments above
            plus the task (label names, max length) and the operating point (criterion,
            thresholds) that :meth:`save_pretrained` stores; set its fields before saving.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=3, gate_inner_size=16, head_inner_size=16)
        >>> out = encoder(torch.randint(0, 99, (2, 7)), torch.ones(2, 7, dtype=torch.long))
        >>> len(out.exit_logits), tuple(out.gate_probs.shape)
        (2, (2, 2))
        >>> encoder.unwrap() is bert
        True
    """

    def __init__(
        self,
        model: nn.Module,
        num_labels: int | None = None,
        *,
        gate_inner_size: int = 128,
        gate_num_heads: int = 2,
        gate_pooling: GatePooling = "attention",
        head_inner_size: int = 128,
        head_num_heads: int = 4,
        dropout: float = 0.1,
        initial_skip_bias: float = 0.0,
        head_type: HeadType = "attention",
        with_gates: bool = True,
        last_head: str = "exit_head",
    ) -> None:
        super().__init__()
        if head_type not in ("attention", "pooler"):
            raise ValueError(f"head_type must be 'attention' or 'pooler', got {head_type!r}.")
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"AdaptiveEncoder wraps a transformers PreTrainedModel; got {type(model).__name__} "
                            "without a .config.")
        self.adapter: BackboneAdapter = get_backbone(config)
        base_model = getattr(model, "base_model", model)
        is_task_model = base_model is not model
        if num_labels is None:
            num_labels = int(config.num_labels)
        elif is_task_model and int(config.num_labels) != num_labels:
            raise ValueError(f"num_labels={num_labels} does not match the wrapped {type(model).__name__}, whose "
                             f"config.num_labels is {config.num_labels}; pass num_labels={config.num_labels} or "
                             "load the model with the number of labels you need.")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.num_labels = num_labels
        self.backbone = base_model
        self._wrapped = [model]  # a list keeps the task model out of the module tree
        self._replays = ReplayCache()  # prepare(): batches without padding, embedded without the forward
        self._fused_for_inference = False
        hidden_size = int(config.hidden_size)
        num_steps = self.adapter.num_steps(config)
        modules = len(self.adapter.layer_list(base_model))
        expected = int(getattr(config, "num_hidden_groups", 1)) if self.adapter.shared_layers else num_steps
        if modules != expected:  # layers dropped or added without the config: steps would miss or skip layers
            raise ValueError(f"the wrapped {type(model).__name__} holds {modules} layer modules but its config says "
                             f"{expected} (num_hidden_layers); set config.num_hidden_layers to the layers it holds.")
        self.gates = nn.ModuleList(
            SkipGate(hidden_size, gate_inner_size, gate_num_heads, gate_pooling, dropout, initial_skip_bias)
            for _ in range(num_steps if with_gates else 0)
        )
        attached = is_attached(check_last_head(last_head))
        self.exit_heads = nn.ModuleList(
            ExitHead(hidden_size, num_labels, head_inner_size, head_num_heads, dropout)
            if head_type == "attention"
            else PoolerExitHead(hidden_size, num_labels, dropout)
            for _ in range(num_steps - attached)
        )
        if attached:  # the model's own classifier modules, shared
            self.exit_heads.append(classifier_exit_head(model, last_head))
        self.adaptive_config = AdaptiveEncoderConfig(
            num_labels=num_labels, head_type=head_type, last_head=last_head, with_gates=with_gates,
            gate_inner_size=gate_inner_size, gate_num_heads=gate_num_heads, gate_pooling=gate_pooling,
            head_inner_size=head_inner_size, head_num_heads=head_num_heads, dropout=dropout,
            initial_skip_bias=initial_skip_bias,
        )
        # Gates and heads live where the backbone lives, in its floating dtype (a bf16 or float64
        # backbone would otherwise meet float32 gates in the first matmul).
        reference = next((p for p in self.backbone.parameters() if p.is_floating_point()), None)
        if reference is not None:
            self.gates.to(device=reference.device, dtype=reference.dtype)
            self.exit_heads.to(device=reference.device, dtype=reference.dtype)

    @property
    def config(self) -> Any:
        """The wrapped model's configuration."""
        return self.backbone.config

    @property
    def num_steps(self) -> int:
        """Number of layer applications ``L`` (one head, and one gate unless built without)."""
        return len(self.exit_heads)

    @property
    def has_gates(self) -> bool:
        """Whether the encoder was built with skip gates."""
        return len(self.gates) > 0

    @property
    def fused_for_inference(self) -> bool:
        """Whether :meth:`fuse_for_inference` is on."""
        return self._fused_for_inference

    def fuse_for_inference(self, enabled: bool = True) -> AdaptiveEncoder:
        """Run the attention gates and heads at inference as fused matmuls over weights derived once.

        Each attention gate's and head's pooling and the linear layer after it become the narrowing
        matmul, then four small matmuls and a softmax, with ``sigmoid`` in place of ``tanh`` in float32
        and float64 (see :mod:`adaptive_depth.fused_pool`): in float32 the same decisions, logits equal
        within float rounding (in bf16/fp16 a row within rounding of a threshold can decide otherwise),
        fewer operators per call (the trained MiniLM's gate, one thread: 128 -> 92 us at batch 1 and 42
        tokens, 719 -> 550 us on 32 rows of 13 tokens; docs/benchmarks.md). Training, gradients,
        ``torch.compile``, ``torch.export`` and ONNX export keep the unfused path, and the ``exact`` MACs
        count the fused one while it is on.

        The derived weights are rebuilt when a parameter changes through an in-place operation (an
        optimizer step, ``load_state_dict``), is replaced, or moves (``.to()``); an edit through ``.data``
        is not seen: call this again after one. :class:`~adaptive_depth.AdaptivePipeline` loaded with
        ``from_pretrained`` turns it on.

        Args:
            enabled: ``False`` drops the derived weights and runs the unfused path again.

        Returns:
            ``self``.
        """
        for module in (*self.gates, *self.exit_heads):
            if hasattr(module, "_set_fused"):
                module._set_fused(enabled)
        self._fused_for_inference = bool(enabled)
        return self

    def save_pretrained(self, save_directory: str | os.PathLike[str], tokenizer: Any = None,
                        overwrite: bool = True) -> Path:
        """Save the backbone (HF format), the gates and heads (safetensors) and
        :attr:`adaptive_config` (JSON) to one folder, atomically; see :mod:`adaptive_depth.pretrained`.

        Args:
            save_directory: destination folder.
            tokenizer: also saved there when given (needed by :class:`~adaptive_depth.AdaptivePipeline`).
            overwrite: replace a model saved there before.
        """
        from adaptive_depth.pretrained import save_pretrained

        return save_pretrained(self, save_directory, tokenizer, overwrite)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, attn_implementation: str | None = None,
                        revision: str | None = None, verify: bool = True) -> AdaptiveEncoder:
        """Rebuild a model written by :meth:`save_pretrained` (a folder or a Hub id), in eval mode,
        after checking its files' SHA-256 (``verify=False``: not, after a deliberate edit); the
        arguments are those of :func:`adaptive_depth.pretrained.load_pretrained`.

        Example:
            >>> import tempfile
            >>> from transformers import BertConfig, BertModel
            >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
            ...                             num_attention_heads=4, intermediate_size=37))
            >>> folder = AdaptiveEncoder(bert, num_labels=2, gate_inner_size=16).save_pretrained(tempfile.mkdtemp() + "/m")
            >>> AdaptiveEncoder.from_pretrained(folder).num_steps
            2
        """
        from adaptive_depth.pretrained import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                               revision=revision, verify=verify)

    @classmethod
    def from_classifier(cls, model_or_path: nn.Module | str | os.PathLike[str], *, with_gates: bool = False,
                        attn_implementation: str | None = None, **options: Any) -> AdaptiveEncoder:
        """Wrap a fine-tuned ``*ForSequenceClassification`` (or its folder, loaded offline) whose own
        classifier becomes the last exit, so that full depth (engine ``mode="full"``, ``heads="last"``)
        gives the model's own logits; the new exit heads (and gates, ``with_gates=True``) are to be
        trained by distillation (``python -m recipes.attach``). ``attn_implementation``: for a folder;
        ``options``: the other :class:`AdaptiveEncoder` arguments. Families and refusals:
        :mod:`adaptive_depth.classifiers`.

        Example:
            >>> from transformers import BertConfig, BertForSequenceClassification
            >>> model = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
            ...                                                  num_attention_heads=4, intermediate_size=37)).eval()
            >>> encoder = AdaptiveEncoder.from_classifier(model, head_inner_size=16).eval()
            >>> ids = torch.randint(0, 99, (2, 7))
            >>> torch.allclose(encoder(ids, heads="last", gate_mode="run").logits, model(ids).logits, atol=1e-6)
            True
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            model_or_path = load_classifier(model_or_path, attn_implementation)
        encoder = cls(model_or_path, with_gates=with_gates, last_head=classifier_name(model_or_path), **options)
        encoder.adaptive_config.label_names = classifier_label_names(model_or_path)
        return encoder

    def unwrap(self) -> nn.Module:
        """The model that was wrapped, unchanged in structure (its weights are shared)."""
        return self._wrapped[0]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the wrapped encoder (embeddings and layers)."""
        return list(self.backbone.parameters())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter once, by role, each list in module order (for optimizer groups).

        Returns:
            ``backbone`` (embeddings and layers), ``gates``, ``intermediate_heads`` (heads
            ``1..L-1``) and ``last_head``.
        """
        backbone = self.backbone_parameters()
        in_backbone = {id(parameter) for parameter in backbone}
        return {
            "backbone": backbone,
            "gates": list(self.gates.parameters()),
            "intermediate_heads": [p for head in self.exit_heads[:-1] for p in head.parameters()],
            # an attached BERT's or ALBERT's classifier also runs the backbone's pooler
            "last_head": [p for p in self.exit_heads[-1].parameters() if id(p) not in in_backbone],
        }

    def full_depth_macs(self, seq_len: int, convention: Literal["paper", "exact"] = "exact") -> int:
        """MACs of one sequence at full depth: embedding, every layer and the last head, no gate.

        The denominator of every relative cost (engine traces, calibration, benchmarks).
        """
        from adaptive_depth.flops import encoder_cost

        return encoder_cost(self, seq_len, convention).full_depth_macs()

    def prepare(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **model_inputs: Any,
    ) -> tuple[LayerRunner, Tensor]:
        """Validate the inputs, embed them and return a :class:`LayerRunner` and the ``[B, N]`` mask.

        The backbone's forward runs up to its first layer (:meth:`LayerRunner.capture`), or for a batch
        without padding, the embeddings alone where that is the same (:mod:`adaptive_depth.embedding_replay`).

        Raises:
            ValueError: on an empty batch, a mask whose shape differs from ``input_ids``, a row
                with no real token, padding before a real token (left padding), more tokens than
                the position table holds, or a keyword the wrapped model's ``forward`` does not
                take (a misspelling would be ignored by it).
        """
        if model_inputs:
            check_input_names(self.backbone, model_inputs)
        attention_mask, token_mask = check_batch(input_ids, attention_mask, model_inputs,
                                                 self.adapter.max_tokens(self.config), self.config.model_type)
        if input_ids is not None:
            model_inputs["input_ids"] = input_ids
        return self._replays.runner(self.backbone, token_mask, self.training, attention_mask=attention_mask,
                                    **model_inputs), token_mask

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        gate_mode: GateMode = "soft",
        gate_values: Tensor | None = None,
        heads: HeadSelection | Sequence[int] = "all",
        return_head_token_states: bool = False,
        gate_threshold: float | None = None,
        **model_inputs: Any,
    ) -> AdaptiveEncoderOutput:
        """Training forward: every layer runs and the gates mix (paper eq. 1).

        Args:
            input_ids: ``[B, N]`` token ids.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding.
            gate_mode: ``"soft"`` mixes with ``p_skip``; ``"hard"`` with ``1[p_skip >= t]`` and the
                straight-through gradient (eq. 11-12); ``"run"`` never skips (the plain model);
                ``"skip"`` skips every layer.
            gate_values: optional ``[L]`` or ``[B, L]`` values in ``[0, 1]`` that replace the
                gates' decisions (1 = skip), e.g. to force single layers.
            heads: which exit heads run: ``"all"``, ``"last"``, ``"intermediate"`` (all but the
                last, stage 2), ``"none"``, or a sequence of 0-based step indices.
            return_head_token_states: also return each run head's attention outputs.
            gate_threshold: the hard-gate threshold ``t``; ``None``: :attr:`adaptive_config`'s.
            **model_inputs: passed to the HF model (``token_type_ids``, ``position_ids``...).

        Returns:
            :class:`AdaptiveEncoderOutput`.
        """
        runner, token_mask = self.prepare(input_ids, attention_mask, **model_inputs)
        gate_threshold = self.adaptive_config.gate_threshold if gate_threshold is None else check_gate_threshold(
            gate_threshold)
        batch_size = token_mask.shape[0]
        head_steps = selected_head_steps(heads, self.num_steps)
        forced = forced_gate_values(gate_values, batch_size, self.num_steps, token_mask.device)

        hidden = runner.hidden_states
        hidden_states = [hidden]
        probabilities, applied = [], []
        exit_logits: list[Tensor | None] = [None] * self.num_steps
        head_token_states: list[Tensor | None] = [None] * self.num_steps
        if not self.has_gates and forced is None and gate_mode != "run":
            raise ValueError(f"this encoder was built with_gates=False; gate_mode={gate_mode!r} needs gates, use 'run'.")
        for step in range(self.num_steps):
            if self.has_gates:
                p_skip = self.gates[step](hidden, token_mask).p_skip
            else:
                p_skip = hidden.new_zeros(batch_size)
            if forced is not None:
                mix = forced[:, step].to(hidden.dtype)
            elif gate_mode == "soft":
                mix = p_skip
            elif gate_mode == "hard":
                mix = straight_through_hard(p_skip, gate_threshold)
            elif gate_mode == "run":
                mix = torch.zeros_like(p_skip)
            elif gate_mode == "skip":
                mix = torch.ones_like(p_skip)
            else:
                raise ValueError(f"gate_mode must be 'soft', 'hard', 'run' or 'skip', got {gate_mode!r}.")
            if forced is None and gate_mode == "run":
                hidden = runner.run_layer(step, hidden)
            elif forced is None and gate_mode == "skip":
                pass
            else:
                layer_output = runner.run_layer(step, hidden)
                weight = mix[:, None, None]
                hidden = weight * hidden + (1 - weight) * layer_output
            hidden_states.append(hidden)
            probabilities.append(p_skip)
            applied.append(mix)
            if step in head_steps:
                head = self.exit_heads[step](hidden, token_mask, return_head_token_states)
                exit_logits[step] = head.logits
                head_token_states[step] = head.token_states
        return AdaptiveEncoderOutput(
            exit_logits=exit_logits,
            gate_probs=torch.stack(probabilities, dim=-1),
            gate_values=torch.stack(applied, dim=-1),
            hidden_states=hidden_states,
            head_token_states=head_token_states,
            attention_mask=token_mask,
        )
