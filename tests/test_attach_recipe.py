"""``python -m recipes.attach``: exit heads trained on unlabeled text, the fine-tuned model left bit-identical,
the saved folder usable by the pipeline, ``predict`` and ``export``; clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from adaptive_depth import AdaptiveEncoder, AdaptiveInferenceEngine, AdaptivePipeline
from adaptive_depth.export import main as export_main
from adaptive_depth.export_runtime import ExportedEngine
from adaptive_depth.predict import main as predict_main
from recipes.attach import AttachConfig, main, read_texts, train
from recipes.run.errors import ConfigError
from recipes.glue import EncodedDataset, GlueExample, collate, encode_examples, get_task
from recipes.run.loop import make_loader
from tests.conftest import minilm_dir, requires_minilm

pytestmark = [requires_minilm, pytest.mark.usefixtures("one_thread")]

WORDS = "the a film movie plot actor was is great awful dull fun boring moving story cast very not".split()


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14))) for _ in range(count)]


def save_classifier(folder: Path, num_labels: int = 2, num_layers: int = 3,
                    labels: dict[int, str] | None = None) -> Path:
    """A random hidden-32 BERT classifier with the real MiniLM tokenizer, saved as a user would."""
    torch.manual_seed(0)
    labels = labels or ({0: "0", 1: "1"} if num_labels == 2 else {0: "LABEL_0"})
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=num_labels, id2label=labels,
                        label2id={name: index for index, name in labels.items()})
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attach")
    texts = root / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": text}) + "\n" for text in sentences(48, 0)), encoding="utf-8")
    dev = root / "dev.tsv"
    dev.write_text("sentence\tlabel\n" + "".join(f"{text}\t{i % 2}\n" for i, text in enumerate(sentences(20, 1))),
                   encoding="utf-8")
    return {"model": save_classifier(root / "fine-tuned"), "texts": texts, "dev": dev,
            "regression": save_classifier(root / "regressor", num_labels=1)}


def cli_argv(files: dict[str, Path], out: Path) -> list[str]:
    return ["--model", str(files["model"]), "--texts", str(files["texts"]), "--task", "sst2", "--eval-texts",
            str(files["dev"]), "--output-dir", str(out), "epochs=2", "batch_size=8", "head_inner_size=16"]


@pytest.fixture(scope="module")
def trained(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of ``python -m recipes.attach`` on the tiny classifier (two epochs)."""
    out = tmp_path_factory.mktemp("attach-run") / "run"
    assert main(cli_argv(files, out)) == 0
    return out


def test_the_cli_trains_saves_and_the_folder_serves_predict(files: dict[str, Path], trained: Path,
                                                            tmp_path: Path) -> None:
    out = trained
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == {"train": 43, "heldout": 5} and results["selected_epoch"] in (1, 2)
    assert [len(epoch["heldout_agreement"]) for epoch in results["history"]] == [3, 3]
    assert all(epoch["heldout_agreement"][-1] == 1.0 for epoch in results["history"])  # the last head is full depth
    assert results["eval"]["full_depth_vs_model"] == {"max_abs_logit_difference": 0.0, "rows_predicted_differently": 0}
    assert results["eval"]["metric_full_depth"] == results["eval"]["metric_model"]
    assert results["command"].startswith("python -m recipes.attach --model") and results["date"]
    # The fine-tuned model inside the saved folder is the one given, bit for bit.
    original = AutoModelForSequenceClassification.from_pretrained(files["model"]).state_dict()
    saved = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    assert all(torch.equal(saved[key], original[key]) for key in original)
    config = AdaptiveEncoder.from_pretrained(out / "model").adaptive_config  # the manifest is checked on load
    assert (config.last_head, config.metric, config.text_pair, config.label_names) == (
        "classifier:bert", "accuracy", False, ["0", "1"])

    texts = [line.split("\t")[0] for line in files["dev"].read_text().splitlines()[1:]]
    pipeline = AdaptivePipeline.from_pretrained(out / "model", mode="full")
    reference = AutoModelForSequenceClassification.from_pretrained(files["model"]).eval()
    batch = pipeline.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**batch).logits.argmax(-1).tolist()
    assert [prediction.label_id for prediction in pipeline(texts)] == expected
    assert predict_main([str(out / "model"), "--input", str(files["dev"]), "--label-column", "label",
                         "--output", str(tmp_path / "predictions.jsonl"), "--no-progress"]) == 0
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 20


def test_a_taken_run_folder_is_refused_unless_overwritten(files: dict[str, Path], tmp_path: Path) -> None:
    argv = [*cli_argv(files, tmp_path / "run"), "epochs=1"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    assert main(argv) == 2  # the run folder is taken
    assert main([*argv, "--overwrite"]) == 0
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())["history"]) == 1


@pytest.mark.slow
def test_the_attached_folder_exports(trained: Path, tmp_path: Path) -> None:
    """torch.export of the saved folder gives the engine's exits (slow: the export takes ~20 s on 2 cores)."""
    assert export_main([str(trained / "model"), str(tmp_path / "exported"), "--format", "torch-export"]) == 0
    encoder = AdaptiveEncoder.from_pretrained(trained / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(trained / "model"))
    batch = tokenizer(sentences(6, 2), padding=True, return_tensors="pt")
    engine = AdaptiveInferenceEngine(encoder, encoder.adaptive_config.make_criterion(), mode="exit_only")
    exported = ExportedEngine(tmp_path / "exported")(**{key: batch[key] for key in ("input_ids", "attention_mask")})
    assert torch.equal(exported.exit_layer, engine(batch["input_ids"], batch["attention_mask"]).exit_layer)


def test_training_moves_only_the_new_heads(files: dict[str, Path]) -> None:
    config = AttachConfig(epochs=1, batch_size=8, head_inner_size=16)
    torch.manual_seed(0)
    encoder = AdaptiveEncoder.from_classifier(files["model"], head_inner_size=16)
    tokenizer = AutoTokenizer.from_pretrained(str(files["model"]))
    frozen = {key: value.clone() for key, value in encoder.unwrap().state_dict().items()}
    heads = {key: value.clone() for key, value in encoder.exit_heads[:-1].state_dict().items()}
    examples = [GlueExample(text, None, 0, str(i)) for i, text in enumerate(sentences(24, 2))]
    split = encode_examples(examples, tokenizer, 32)
    heldout = make_loader(EncodedDataset(split), 8, lambda rows: collate(rows, tokenizer.pad_token_id), False, 0)
    history, selected = train(encoder, config, split, heldout, tokenizer.pad_token_id)
    assert selected == 1 and len(history) == 1
    assert all(torch.equal(value, frozen[key]) for key, value in encoder.unwrap().state_dict().items())
    assert not any(parameter.requires_grad for parameter in encoder.backbone.parameters())
    assert any(not torch.equal(value, heads[key]) for key, value in encoder.exit_heads[:-1].state_dict().items())


def test_gates_and_regression_train_too(files: dict[str, Path], tmp_path: Path) -> None:
    assert main(["--model", str(files["model"]), "--texts", str(files["texts"]), "--output-dir", str(tmp_path / "g"),
                 "with_gates=true", "gate_epochs=1", "epochs=1", "batch_size=8", "head_inner_size=16"]) == 0
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert [epoch["phase"] for epoch in results["history"]] == ["gates", "heads"]
    assert 0.0 <= results["history"][-1]["heldout_layers_run"] <= 1.0
    assert AdaptiveEncoder.from_pretrained(tmp_path / "g" / "model").has_gates
    assert main(["--model", str(files["regression"]), "--texts", str(files["texts"]), "--output-dir",
                 str(tmp_path / "r"), "epochs=1", "batch_size=8", "head_inner_size=16"]) == 0
    history = json.loads((tmp_path / "r" / "results.json").read_text())["history"]
    assert history[0]["heldout_agreement"][-1] == 0.0  # minus the mean absolute difference to itself
    # The documented flow on from there: a regression model's saved operating point decides on one score
    # (it was the entropy default, which needs classes: calibrate and predict failed), is certified, serves.
    from adaptive_depth.calibrate import main as calibrate_main

    folder = tmp_path / "r" / "model"
    assert AdaptiveEncoder.from_pretrained(folder).adaptive_config.criterion == "tolerance"
    assert calibrate_main([str(folder), "--input", str(files["texts"]), "--max-risk", "0.2", "--tolerance", "0.5",
                           "--no-progress"]) == 0
    config = AdaptiveEncoder.from_pretrained(folder).adaptive_config
    assert config.certificate["risk"] == "moved" and config.threshold == config.certificate["threshold"]
    assert predict_main([str(folder), "--input", str(files["dev"]), "--output", str(tmp_path / "scores.jsonl"),
                         "--no-progress"]) == 0
    scores = [json.loads(line)["score"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 20 and all(isinstance(score, float) for score in scores)


def test_glue_files_give_their_text_pairs_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "dev.tsv"
    path.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat sat .\tA cat sits .\n"
                    "0\t3\t4\tIt rains .\tThe sun shines .\n", encoding="utf-8")
    rows = read_texts(str(path), get_task("mrpc"), None, None, with_labels=True)
    assert rows == (["A cat sat .", "It rains ."], ["A cat sits .", "The sun shines ."], [1, 0])
    qnli = tmp_path / "qnli.tsv"
    qnli.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n", encoding="utf-8")
    assert read_texts(str(qnli), get_task("qnli"), None, None, with_labels=True) == (["Who?"], ["Him."], [0])
    assert read_texts(str(qnli), None, None, None, with_labels=True).labels is None  # no task: no labels read
    # Without --task the pair is found by name too, as predict finds it (the question was dropped).
    assert read_texts(str(qnli), None, None, None, with_labels=False)[:2] == (["Who?"], ["Him."])
    # SST-2's test.tsv has as many columns as its train file, but its first holds the row index.
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence\n0\tA fine film .\n1\tDull .\n", encoding="utf-8")
    assert read_texts(str(test), get_task("sst2"), None, None, with_labels=True) == (["A fine film .", "Dull ."],
                                                                                      None, None)
    # CoLA's files have no header: every line is a row, read by the task's positions.
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tOur friends won't buy this .\ngj04\t0\t*\tThem buy .\n", encoding="utf-8")
    assert read_texts(str(cola), get_task("cola"), None, None, with_labels=True) == (
        ["Our friends won't buy this .", "Them buy ."], None, [1, 0])
    named = tmp_path / "named.tsv"  # a CoLA-task file a user wrote with a header
    named.write_text("sentence\tlabel\nFine .\t1\n", encoding="utf-8")
    assert read_texts(str(named), get_task("cola"), None, None, with_labels=True) == (["Fine ."], None, [1])


@pytest.mark.parametrize("case, message", [
    ("no-folder", "no such folder"), ("base-model", "not a fine-tuned *ForSequenceClassification"),
    ("empty", "holds no rows"), ("no-text", "no text column"), ("one-row", "at least 2 are needed"),
    ("bad-key", "unknown config key 'epoch'"), ("bad-value", "holdout_fraction must be in (0, 1)"),
    ("task-mismatch", "--task stsb has 1 output(s) (a score) but the model in --model has 2"),
    ("one-layer", "has 1 layer: no layer to exit after"),
])
def test_errors_are_one_line(files: dict[str, Path], tmp_path: Path, capsys, case: str, message: str) -> None:
    model, texts, extra = str(files["model"]), tmp_path / "texts.jsonl", []
    texts.write_text('{"text": "fine"}\n{"text": "also fine"}\n')
    if case == "no-folder":
        model = str(tmp_path / "nowhere")
    elif case == "base-model":
        from transformers import AutoModel

        AutoModel.from_pretrained(files["model"]).save_pretrained(tmp_path / "base")
        AutoTokenizer.from_pretrained(str(files["model"])).save_pretrained(tmp_path / "base")
        model = str(tmp_path / "base")
    elif case == "empty":
        texts.write_text("\n")
    elif case == "no-text":
        texts.write_text('{"body": "x"}\n')
    elif case == "one-row":
        texts.write_text('{"text": "alone"}\n')
    elif case == "task-mismatch":  # the folder used to be saved with a metric it could not load with
        extra = ["--task", "stsb"]
    elif case == "one-layer":  # no intermediate head: AdamW got no parameters
        model = str(save_classifier(tmp_path / "one-layer", num_layers=1))
    else:
        extra = ["epoch=2"] if case == "bad-key" else ["holdout_fraction=1.5"]
    assert main(["--model", model, "--texts", str(texts), "--output-dir", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "run").exists()


def test_config_checks_its_ranges() -> None:
    with pytest.raises(ConfigError, match="target_cost must be in"):
        AttachConfig(target_cost=1.5)
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        AttachConfig(epochs=0)


def test_a_plain_fine_tune_then_attach_the_users_flow(files: dict[str, Path], glue_dir: Path, tmp_path: Path) -> None:
    from benchmarks.finetune_hf import main as finetune_main

    model = tmp_path / "fine-tuned"
    assert finetune_main(["--task", "mrpc", "--data-dir", str(glue_dir), "--model", str(files["model"]),
                          "--output-dir", str(model), "--epochs", "1", "--batch-size", "8", "--train-rows", "0:24",
                          "--threads", "1"]) == 0
    record = json.loads((model / "finetune.json").read_text())
    assert record["num_train_rows"] == 24 and record["dev_metric"] == "f1" and set(record["dev"]) == {"accuracy", "f1"}
    assert AutoModelForSequenceClassification.from_pretrained(model).config.id2label == {0: "0", 1: "1"}
    assert finetune_main(["--task", "mrpc", "--data-dir", str(glue_dir), "--output-dir", str(model)]) == 2  # not empty
    dev = glue_dir / "MRPC" / "dev.tsv"
    assert main(["--model", str(model), "--texts", str(glue_dir / "MRPC" / "train.tsv"), "--task", "mrpc",
                 "--eval-texts", str(dev), "--output-dir", str(tmp_path / "run"), "epochs=1", "head_inner_size=16"]) == 0
    report = json.loads((tmp_path / "run" / "results.json").read_text())["eval"]
    assert report["rows"] == 16 and report["full_depth_vs_model"]["rows_predicted_differently"] == 0
    assert report["metric_full_depth"] == report["metric_model"] == record["dev"]  # the same model, the same score


def test_the_msr_test_file_is_parsed_strictly(tmp_path: Path) -> None:
    from benchmarks.attach_data import read_msr_test

    path = tmp_path / "msr_paraphrase_test.txt"
    path.write_text('\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t10\t11\t"Quoted" text .\tA pair .\n',
                    encoding="utf-8")
    assert read_msr_test(path) == [{"id": ("10", "11"), "text": '"Quoted" text .', "text_pair": "A pair .", "label": 1}]
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t10\t11\tonly four fields\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected 5 fields"):
        read_msr_test(path)


def test_attach_eval_reports_the_operating_point_against_full_depth_and_the_model(
        files: dict[str, Path], trained: Path, tmp_path: Path) -> None:
    from benchmarks.attach_eval import main as eval_main

    out = tmp_path / "eval.json"
    assert eval_main([str(trained / "model"), "--input", str(files["dev"]), "--original", str(files["model"]),
                      "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rows"] == 20 and report["metric"] == "accuracy"
    assert report["original"]["rows_predicted_differently"] == 0
    assert report["original"]["max_abs_logit_difference"] < 1e-5
    assert report["original"]["metric"] == report["full_depth"]["metric"]
    point = report["operating_point"]
    assert point["metric"] - point["metric_change"] == pytest.approx(report["full_depth"]["metric"])
    assert point["rows_disagreeing"] == round(point["disagreement_with_full_depth"] * 20)
    assert point["flops_speedup_exact"] == pytest.approx(1 / point["relative_cost_exact"])
    assert report["full_depth"]["relative_cost_exact"] == pytest.approx(1.0)
    assert report["command"].startswith("python -m benchmarks.attach_eval") and report["date"]


def test_the_attached_folder_certifies_in_place_and_still_loads(files: dict[str, Path], trained: Path,
                                                                 tmp_path: Path) -> None:
    """``python -m adaptive_depth.calibrate`` on an attached folder: the certificate is saved, the manifest
    stays true (the folder loads with verification), the model's own classifier is still the last exit."""
    import shutil

    from adaptive_depth.calibrate import main as calibrate_main

    folder = shutil.copytree(trained / "model", tmp_path / "model")
    assert calibrate_main([str(folder), "--input", str(files["texts"]), "--max-disagreement", "0.1",
                           "--delta", "0.05", "--no-progress"]) == 0
    encoder = AdaptiveEncoder.from_pretrained(folder)
    certificate = encoder.adaptive_config.certificate
    assert certificate["n"] == 48 and certificate["max_risk"] == 0.1 and certificate["upper_bound"] <= 0.1
    assert encoder.adaptive_config.threshold == certificate["threshold"]
    assert encoder.adaptive_config.last_head == "classifier:bert"


def test_eval_labels_follow_the_models_own_label_names(files: dict[str, Path], tmp_path: Path) -> None:
    """A classifier whose classes are ordered otherwise than the task's (hub RTE models often put
    not_entailment first) used to be scored with its classes swapped: gold labels went by the task's order."""
    swapped = save_classifier(tmp_path / "swapped", labels={0: "1", 1: "0"})
    dev = tmp_path / "dev.tsv"  # unbalanced gold labels: swapped classes score differently
    dev.write_text("sentence\tlabel\n" + "".join(f"{text}\t{int(i % 4 != 0)}\n" for i, text in enumerate(sentences(20, 1))),
                   encoding="utf-8")
    out = tmp_path / "run"
    assert main(["--model", str(swapped), "--texts", str(files["texts"]), "--task", "sst2", "--eval-texts",
                 str(dev), "--output-dir", str(out), "epochs=1", "batch_size=8", "head_inner_size=16"]) == 0
    reported = json.loads((out / "results.json").read_text())["eval"]["metric_model"]
    model = BertForSequenceClassification.from_pretrained(swapped).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(swapped))
    rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    with torch.no_grad():
        logits = model(**tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")).logits
    names = [model.config.id2label[int(index)] for index in logits.argmax(-1)]
    expected = sum(name == gold for name, (_, gold) in zip(names, rows)) / len(rows)
    assert reported["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_certification_rows_are_held_out_as_text() -> None:
    """SST-2 repeats sentences: certification rows are taken past the trained ones and skip any text that a
    trained row has (30 of SST-2 train rows 24000-31999 repeat one verbatim)."""
    from benchmarks.attach_data import unseen

    rows = [GlueExample(text_a=text, text_b=None, label=0, source=f"SST-2/train.tsv:{line}")
            for line, text in enumerate(["a", "b", "c", "b", "d", "a", "e"], start=2)]
    assert [row.text_a for row in unseen(rows, 3, 2)] == ["d", "e"]
    assert [row.text_a for row in unseen(rows, 2, 3)] == ["c", "d", "e"]
    with pytest.raises(ValueError, match="only 2 rows from row 3 on have a text not seen before it; 3 are needed"):
        unseen(rows, 3, 3)
