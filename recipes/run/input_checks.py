"""Checks that a model, its tokenizer and the data fit together, before anything is trained.

Each catches a run that would otherwise train silently on something wrong or crash deep inside
torch: a tokenizer whose ids run past the model's vocabulary (``F.embedding`` index error), a
``max_length`` past the position table, or a tokenizer that maps most of the data to ``[UNK]``.

Example:
    >>> from transformers import BertConfig
    >>> position_limit(BertConfig(max_position_embeddings=512))
    512
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recipes.run.errors import InputCheckError

__all__ = ["check_model_inputs", "check_unknown_tokens", "position_limit"]


def position_limit(model_config: Any) -> int | None:
    """How many tokens the model's absolute position table holds (``None``: no limit); the
    family's rule lives in :data:`adaptive_depth.backbones.BACKBONES` (RoBERTa-style and MPNet
    models number positions from ``pad_token_id + 1``)."""
    from adaptive_depth.backbones import get_backbone

    return get_backbone(model_config).max_tokens(model_config)


def check_model_inputs(model_config: Any, tokenizer: Any, max_length: int, model_name: str) -> None:
    """The inputs the recipe will feed fit the model: the tokenizer's ids are inside the model's
    vocabulary and ``max_length`` is inside its position table.

    Raises:
        InputCheckError: otherwise (F.embedding would fail with an index error mid-training, or
            read past the position table), or the tokenizer has no padding token.
    """
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise InputCheckError(f"the tokenizer of {model_name} has no padding token, which batching needs; set one "
                              "(tokenizer.pad_token = ...) and save it into the model folder")
    vocab_size = getattr(model_config, "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise InputCheckError(
            f"the tokenizer of {model_name} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
            "ids past the table would crash the embedding; use the tokenizer saved with this model"
        )
    limit = position_limit(model_config)
    if limit is not None and max_length > limit:
        raise InputCheckError(
            f"max_length={max_length} is longer than the position table of {model_name} ({limit} positions); "
            f"pass max_length={min(limit, 512)} or less"
        )


def check_unknown_tokens(input_ids: Sequence[Sequence[int]], tokenizer: Any, model_name: str,
                         limit: float = 0.5, max_rows: int = 5000) -> None:
    """Refuse data whose tokens are mostly ``[UNK]`` (a tokenizer that does not belong to the model
    or the data's language); ``limit`` is the largest share of unknown tokens allowed, counted
    over the first ``max_rows`` rows.

    Raises:
        InputCheckError: more than ``limit`` of the non-special tokens are the unknown token.
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    special = set(getattr(tokenizer, "all_special_ids", [])) - {unknown}
    total = unknowns = 0
    for ids in input_ids[:max_rows]:
        for token in ids:
            if token not in special:
                total += 1
                unknowns += token == unknown
    if total and unknowns / total > limit:
        raise InputCheckError(
            f"{100 * unknowns / total:.0f}% of the training tokens are the unknown token with the tokenizer of "
            f"{model_name} ({len(tokenizer)} tokens): it does not fit the data; pass a --model folder with its own "
            "tokenizer files"
        )
