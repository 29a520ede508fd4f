"""Checks of what goes into an :class:`~adaptive_depth.AdaptiveEncoder`: shapes, padding side,
the position table, and input names the wrapped model would silently ignore."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_batch", "check_input_names", "forced_gate_values", "selected_head_steps"]

_ACCEPTED: dict[type, frozenset[str]] = {}


def check_input_names(model: nn.Module, model_inputs: dict[str, Any]) -> None:
    """Refuse keyword inputs the model's ``forward`` does not take (``token_type_id=`` would be
    swallowed by its ``**kwargs``)."""
    accepted = _ACCEPTED.get(type(model))
    if accepted is None:
        parameters = inspect.signature(model.forward).parameters.values()
        accepted = frozenset(parameter.name for parameter in parameters
                             if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL))
        _ACCEPTED[type(model)] = accepted
    unknown = sorted(set(model_inputs) - accepted)
    if unknown:
        raise ValueError(
            f"{type(model).__name__}.forward takes no input named {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(accepted))}."
        )


def check_batch(input_ids: Tensor | None, attention_mask: Tensor | None, model_inputs: dict[str, Any],
                max_tokens: int | None, model_type: str) -> tuple[Tensor, Tensor]:
    """Validate one batch; returns ``(attention_mask, token_mask)`` (a default all-ones mask if none).

    Raises:
        TypeError: ``input_ids``, ``inputs_embeds`` or ``attention_mask`` is not a tensor (a list, say).
        ValueError: no ``input_ids`` (or ``inputs_embeds``), ids not ``[B, N]`` (embeddings not
            ``[B, N, H]``), an empty batch, a mask whose shape
            differs, more tokens than the position table holds (``max_tokens``), a row with no real
            token, or padding before a real token (left padding).
    """
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    reference = input_ids if input_ids is not None else model_inputs.get("inputs_embeds")
    if reference is None:
        raise ValueError("pass input_ids (or inputs_embeds) of shape [B, N].")
    for key, value in ((name, reference), ("attention_mask", attention_mask)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{key} must be a torch.Tensor, got a {type(value).__name__}; a tokenizer gives "
                            "tensors with return_tensors='pt'.")
    expected = 2 if input_ids is not None else 3  # [B, N] ids, or [B, N, H] embeddings
    if reference.ndim != expected:
        shape = "[B, N]" if expected == 2 else "[B, N, H]"
        raise ValueError(f"{name} must be {shape}, got shape {tuple(reference.shape)}.")
    batch_size, num_tokens = reference.shape[:2]
    if batch_size == 0 or num_tokens == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(reference.shape)}.")
    position_ids = model_inputs.get("position_ids")
    if max_tokens is not None and position_ids is None and num_tokens > max_tokens:
        raise ValueError(
            f"inputs have {num_tokens} tokens but the {model_type} position table holds "
            f"{max_tokens}; truncate the inputs to at most {max_tokens} tokens (max_length={max_tokens})."
        )
    if attention_mask is None:  # no padding: nothing to check
        if isinstance(position_ids, Tensor) and position_ids.shape[-1] > 1 and bool(
                (position_ids[..., 1:] - position_ids[..., :-1] != 1).any()):
            raise ValueError(
                "position_ids restart or jump within a row and no attention_mask was given: transformers reads "
                "that as several sequences packed in one row, adaptive_depth runs one sequence per row (its gates "
                "and heads read the first token). Pass an attention_mask, or one sequence per row."
            )
        attention_mask = torch.ones(batch_size, num_tokens, dtype=torch.long, device=reference.device)
        return attention_mask, attention_mask.bool()
    if tuple(attention_mask.shape) != (batch_size, num_tokens):
        raise ValueError(
            f"attention_mask must have the shape of input_ids, [B, N] = {(batch_size, num_tokens)}, "
            f"got {tuple(attention_mask.shape)}."
        )
    token_mask = attention_mask.bool()
    # Padding must be on the right: gates and heads read position 0 as [CLS], and models with
    # absolute positions (BERT) embed a left-padded row differently from the same row alone.
    # One check (one host sync) covers empty rows and padding before a real token.
    padding_before_token = token_mask[:, 1:] & ~token_mask[:, :-1]
    if bool((~token_mask[:, 0] | padding_before_token.any(dim=-1)).any()):
        _raise_for_bad_mask(token_mask)
    return attention_mask, token_mask


def _raise_for_bad_mask(token_mask: Tensor) -> None:
    """Explain why a ``[B, N]`` bool mask was refused (no real token, or not right-padded)."""
    empty_rows = (~token_mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"rows {empty_rows} of attention_mask have no real token.")
    rows = (~token_mask[:, 0] | (token_mask[:, 1:] & ~token_mask[:, :-1]).any(dim=-1)).nonzero().flatten().tolist()
    raise ValueError(
        f"rows {rows} of attention_mask have padding before a real token (left padding?); adaptive_depth "
        "needs right padding, because gates and exit heads read the first position as [CLS]. Set "
        "tokenizer.padding_side = 'right' (or pad on the right yourself)."
    )


def selected_head_steps(heads: str | Sequence[int], num_steps: int) -> set[int]:
    """The 0-based steps whose heads run for ``AdaptiveEncoder.forward(heads=...)``: ``"all"``,
    ``"last"``, ``"intermediate"`` (all but the last), ``"none"`` or step indices."""
    last = num_steps - 1
    if isinstance(heads, str):
        choices = {"all": set(range(num_steps)), "last": {last}, "intermediate": set(range(last)), "none": set()}
        if heads not in choices:
            raise ValueError(f"heads must be one of {sorted(choices)} or step indices, got {heads!r}.")
        return choices[heads]
    steps = {int(step) for step in heads}
    out_of_range = sorted(step for step in steps if not 0 <= step <= last)
    if out_of_range:
        raise ValueError(f"head steps {out_of_range} are outside 0..{last}.")
    return steps


def forced_gate_values(gate_values: Tensor | None, batch_size: int, num_steps: int,
                       device: torch.device) -> Tensor | None:
    """``gate_values`` (``[L]`` or ``[B, L]`` in ``[0, 1]``, 1 = skip) as ``[B, L]`` on ``device``."""
    if gate_values is None:
        return None
    if gate_values.ndim == 1:
        gate_values = gate_values.unsqueeze(0).expand(batch_size, -1)
    if tuple(gate_values.shape) != (batch_size, num_steps):
        raise ValueError(f"gate_values must be [L] or [B, L] = {(batch_size, num_steps)}, got {tuple(gate_values.shape)}.")
    if bool(((gate_values < 0) | (gate_values > 1)).any()):
        raise ValueError("gate_values must lie in [0, 1] (1 = skip the layer).")
    return gate_values.to(device)
