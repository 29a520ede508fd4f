"""A fine-tuned classifier's own head as the last exit: full depth is the model, for every family;
saving and loading it; refusals. The attach recipe is in tests/test_attach_recipe.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification,
                          GPT2Config)

from adaptive_depth import AdaptiveEncoder, AdaptiveEncoderConfig, AdaptiveInferenceEngine, EntropyExit, entropy
from adaptive_depth.backbones import UnsupportedModelError
from adaptive_depth.classifiers import CLASSIFIER_HEADS, classifier_exit_head
from tests.conftest import ALIASES, FAMILIES, counted_flops, minilm_dir, padded_batch, requires_minilm, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(family, implementation) for family in FAMILIES + ALIASES for implementation in ("sdpa", "eager")
         if not (family == "mpnet" and implementation == "sdpa")]  # MPNet has no SDPA path in transformers


def tiny_classifier(model_type: str, num_labels: int = 3, attn_implementation: str = "sdpa", seed: int = 0,
                    **config_values) -> torch.nn.Module:
    """A tiny random ``*ForSequenceClassification`` of ``model_type``, in eval mode."""
    config = tiny_config(model_type)
    config.num_labels = num_labels
    for name, value in config_values.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation).eval()


def test_every_supported_family_has_a_classifier_layout() -> None:
    from adaptive_depth.backbones import BACKBONES

    assert set(CLASSIFIER_HEADS) == set(BACKBONES) == set(FAMILIES + ALIASES)


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classes", "regression"])
@pytest.mark.parametrize("model_type, attn_implementation", CASES)
def test_full_depth_reproduces_the_models_logits(model_type: str, attn_implementation: str, num_labels: int) -> None:
    model = tiny_classifier(model_type, num_labels, attn_implementation)
    encoder = AdaptiveEncoder.from_classifier(model, head_inner_size=16).eval()
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
        forward = encoder(input_ids, attention_mask, gate_mode="run", heads="last").logits
    engine = AdaptiveInferenceEngine(encoder, mode="full")(input_ids, attention_mask)
    assert engine.logits.shape == (4, num_labels)
    torch.testing.assert_close(engine.logits, expected, rtol=0.0, atol=1e-5)
    torch.testing.assert_close(forward, expected, rtol=0.0, atol=1e-5)
    assert encoder.adaptive_config.last_head == f"classifier:{model_type}"
    assert encoder.adaptive_config.problem_type == ("regression" if num_labels == 1 else "single_label_classification")
    assert not encoder.has_gates and encoder.adaptive_config.mode == "exit_only"
    assert encoder.unwrap() is model
    shared = {id(parameter) for parameter in encoder.exit_heads[-1].parameters()}
    assert {id(parameter) for parameter in model.classifier.parameters()} <= shared  # the model's own, not copies


@pytest.mark.parametrize("model_type", FAMILIES)
def test_full_depth_macs_are_what_flop_counter_measures_on_the_model(model_type: str) -> None:
    model = tiny_classifier(model_type, attn_implementation="eager")  # FlopCounterMode counts CPU SDPA as 0
    encoder = AdaptiveEncoder.from_classifier(model, head_inner_size=16).eval()
    input_ids = torch.randint(5, 99, (1, 9), generator=torch.Generator().manual_seed(0))
    out = AdaptiveInferenceEngine(encoder, mode="full")(input_ids)
    assert 2 * int(out.macs_exact[0]) == 2 * int(out.full_macs_exact[0]) == counted_flops(model, input_ids=input_ids)


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "albert", "roberta"])
def test_early_exits_on_a_padded_batch_equal_each_row_alone(model_type: str) -> None:
    encoder = AdaptiveEncoder.from_classifier(tiny_classifier(model_type), head_inner_size=16).eval()
    with torch.no_grad():
        for head in encoder.exit_heads[:-1]:
            head.classifier.weight.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=2)
    with torch.no_grad():  # a threshold between the first head's entropies: some rows leave there, some later
        first = entropy(encoder(input_ids, attention_mask, gate_mode="run", heads=[0]).exit_logits[0])
    engine = AdaptiveInferenceEngine(encoder, EntropyExit(float(first.median())), mode="exit_only")
    batched = engine(input_ids, attention_mask)
    assert len(set(batched.exit_layer.tolist())) > 1, "the test needs rows that exit at different layers"
    for row in range(6):
        length = int(attention_mask[row].sum())
        alone = engine(input_ids[row:row + 1, :length], attention_mask[row:row + 1, :length])
        assert int(alone.exit_layer[0]) == int(batched.exit_layer[row])
        torch.testing.assert_close(alone.logits[0], batched.logits[row], atol=1e-5, rtol=1e-5)


@requires_minilm
def test_the_real_minilm_as_a_bert_classifier_is_reproduced_exactly() -> None:
    path = minilm_dir()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()  # random classifier: fine
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A man is playing a guitar on stage.", "Hi.", "The cat sat on the mat while the dog slept."],
                      padding=True, return_tensors="pt")
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    encoder = AdaptiveEncoder.from_classifier(model).eval()
    assert encoder.num_steps == 6
    with torch.no_grad():
        expected = model(**batch).logits
    torch.testing.assert_close(AdaptiveInferenceEngine(encoder, mode="full")(**batch).logits, expected,
                               rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_and_load_keep_the_models_own_classifier(model_type: str, tmp_path: Path) -> None:
    model = tiny_classifier(model_type, attn_implementation="eager", id2label={0: "neg", 1: "neu", 2: "pos"},
                            label2id={"neg": 0, "neu": 1, "pos": 2})
    encoder = AdaptiveEncoder.from_classifier(model, head_inner_size=16, with_gates=True).eval()
    assert encoder.adaptive_config.label_names == ["neg", "neu", "pos"]
    folder = encoder.save_pretrained(tmp_path / "model")
    config = json.loads((folder / "adaptive_config.json").read_text())
    assert config["last_head"] == f"classifier:{model_type}" and config["with_gates"] is True
    # The folder's Hugging Face files are the whole fine-tuned model, unchanged ...
    original = model.state_dict()
    reloaded_hf = AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
    assert sorted(reloaded_hf) == sorted(original)
    assert all(torch.equal(reloaded_hf[key], original[key]) for key in original)
    # ... and the adaptive weights hold only the new gates and heads.
    last = encoder.num_steps - 1
    saved = load_file(str(folder / "adaptive_heads.safetensors"))
    assert saved and not any(key.startswith(("backbone.", f"exit_heads.{last}.")) for key in saved)
    reloaded = AdaptiveEncoder.from_pretrained(folder)
    assert reloaded.adaptive_config == encoder.adaptive_config
    input_ids, attention_mask = padded_batch()
    for mode in ("full", "adaptive"):
        expected = AdaptiveInferenceEngine(encoder, mode=mode)(input_ids, attention_mask)
        got = AdaptiveInferenceEngine(reloaded, mode=mode)(input_ids, attention_mask)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.layers_run, expected.layers_run)


def test_every_parameter_is_in_one_group_once() -> None:
    for model_type in ("bert", "albert", "distilbert"):
        encoder = AdaptiveEncoder.from_classifier(tiny_classifier(model_type), with_gates=True, head_inner_size=16)
        grouped = [id(p) for group in encoder.parameter_groups().values() for p in group]
        assert len(grouped) == len(set(grouped)) == len(list(encoder.parameters()))


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multi-label"):
        AdaptiveEncoder.from_classifier(tiny_classifier("bert", problem_type="multi_label_classification"))
    with pytest.raises(ValueError, match="one score"):
        AdaptiveEncoder.from_classifier(tiny_classifier("roberta", num_labels=2, problem_type="regression"))
    with pytest.raises(TypeError, match=r"ForSequenceClassification, got BertModel"):
        AdaptiveEncoder.from_classifier(AutoModel.from_config(tiny_config("bert")))
    gpt2 = AutoModelForSequenceClassification.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=99))
    with pytest.raises(UnsupportedModelError, match="supported: albert, bert, camembert"):
        AdaptiveEncoder.from_classifier(gpt2)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(tmp_path / "base")
    with pytest.raises(TypeError, match="holds a BertModel, not a fine-tuned"):
        AdaptiveEncoder.from_classifier(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        AdaptiveEncoder.from_classifier(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="last_head must be"):
        AdaptiveEncoderConfig(num_labels=2, last_head="classifier:gpt2")
    with pytest.raises(ValueError, match="does not fit"):
        classifier_exit_head(tiny_classifier("bert"), "classifier:roberta")
    with pytest.raises(ValueError, match="no token states"):
        AdaptiveEncoder.from_classifier(tiny_classifier("bert")).exit_heads[-1](torch.randn(1, 3, 32),
                                                                                return_token_states=True)


def test_a_folder_path_is_loaded_offline_with_its_attention(tmp_path: Path) -> None:
    model = tiny_classifier("bert", attn_implementation="eager")
    model.save_pretrained(tmp_path / "fine-tuned")
    encoder = AdaptiveEncoder.from_classifier(tmp_path / "fine-tuned", attn_implementation="eager").eval()
    assert encoder.config._attn_implementation == "eager" and not encoder.unwrap().training
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.equal(AdaptiveInferenceEngine(encoder, mode="full")(input_ids, attention_mask).logits, expected)
    with pytest.raises(FileNotFoundError, match="looks like a fine-tuned classifier: python -m recipes.attach"):
        AdaptiveEncoder.from_pretrained(tmp_path / "fine-tuned")
