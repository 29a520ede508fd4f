"""Export the adaptive engine as static-shape pieces plus a small driver, as a folder to deploy.

``torch.jit.trace``, ``torch.export`` and ``torch.onnx.export`` cannot take the engine as a
whole: which rows run which layer depends on the data. So each *step* is exported on its own,
as a graph over a batch of active rows whose only dynamic dimensions are the row count ``R``
and the sequence length ``N``:

- ``embeddings``: ``(input_ids [R, N], token_type_ids [R, N]) -> hidden [R, N, H]`` (what enters
  the first layer: embeddings, then ELECTRA's ``embeddings_project`` or ALBERT's
  ``embedding_hidden_mapping_in``; DistilBERT and MPNet take no ``token_type_ids``);
- ``layer_k``: ``(hidden [R, N, H], attention_mask [R, N]) -> hidden [R, N, H]``; the layer-level
  mask is built inside from the ``[R, N]`` mask as transformers builds it for the model's
  attention implementation (bool for sdpa, additive float for eager);
- ``gate_i``: ``(hidden, attention_mask) -> p_skip [R]``; ``head_i``: ``(hidden, attention_mask) -> logits [R, C]``.

The per-sample skip/exit loop lives in :mod:`adaptive_depth.export_runtime`, which runs these
graphs with ``torch.export`` programs or ONNX Runtime and takes the same decisions as
:class:`adaptive_depth.engine.AdaptiveInferenceEngine`. A ``manifest.json`` records the files,
the operating point (mode, gate threshold, exit criterion), the labels, the truncation length
and the MACs of every step; with a tokenizer the folder classifies raw text
(:class:`adaptive_depth.export_pipeline.ExportedPipeline`).

    python -m adaptive_depth.export MODEL_DIR OUT_DIR --format onnx
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from adaptive_depth.backbones import UnsupportedModelError
from adaptive_depth.config import CriterionName, check_gate_threshold, criterion_from_name, criterion_with_threshold
from adaptive_depth.encoder import AdaptiveEncoder
from adaptive_depth.exits import ExitCriterion
from adaptive_depth.files import staging_folder
from adaptive_depth.export_files import (
    LOG_NAME,
    MANIFEST_VERSION,
    ExportStorageError,
    check_output_dir,
    cost_record,
    criterion_record,
    quiet_exporters,
    storage_error,
)
from adaptive_depth.export_steps import EXPORT_EMBEDDINGS, EmbeddingStep, GateStep, HeadStep, LayerStep

__all__ = ["EXPORT_FORMATS", "ExportFormat", "ExportStorageError", "check_output_dir", "export_engine"]

ExportFormat = Literal["onnx", "torch-export"]
EXPORT_FORMATS: dict[str, str] = {"onnx": ".onnx", "torch-export": ".pt2"}
MODES = ("adaptive", "skip_only", "exit_only", "full")


def _export_one(
    module: nn.Module,
    example: dict[str, Tensor],
    output_name: str,
    path: Path,
    export_format: str,
    max_length: int | None,
    opset: int | None,
) -> None:
    """Export ``module`` called with keyword tensors ``example``; dims 0 (rows) and 1 (tokens) are dynamic."""
    rows = torch.export.Dim("rows", min=1, max=1 << 20)
    tokens = torch.export.Dim("tokens", min=1, max=max_length or (1 << 20))
    dynamic = {name: {0: rows, 1: tokens} for name in example}
    if export_format == "torch-export":
        program = torch.export.export(module, (), kwargs=example, dynamic_shapes=dynamic, strict=False)
        # torch's archive writer, once a write failed (a full disk), aborts the whole process when it is
        # destroyed (std::terminate, torch 2.13): build the archive in memory, and let Python write it.
        archive = io.BytesIO()
        torch.export.save(program, archive)
        path.write_bytes(archive.getbuffer())
        return
    torch.onnx.export(
        module, (), str(path), kwargs=example, dynamo=True, dynamic_shapes=dynamic,
        input_names=list(example), output_names=[output_name], opset_version=opset, external_data=False,
        verbose=False,
    )


def export_engine(
    encoder: AdaptiveEncoder,
    out_dir: str | Path,
    format: ExportFormat = "onnx",  # noqa: A002 - the CLI's word for it
    *,
    criterion: ExitCriterion | None = None,
    gate_threshold: float | None = None,
    mode: str = "adaptive",
    tokenizer: Any = None,
    opset: int | None = None,
    example_length: int = 8,
    verbose: bool = False,
) -> Path:
    """Export ``encoder``'s embeddings, layers, gates and heads as static-shape graphs in ``out_dir``.

    The folder holds one file per step (``embeddings``, ``layer_<k>`` per distinct layer module,
    ``gate_<i>``, ``head_<i>``; ``.onnx`` or ``.pt2``), ``manifest.json`` with the operating point,
    and the tokenizer when one is given. Run it with
    :class:`adaptive_depth.export_runtime.ExportedEngine` (token ids) or
    :meth:`ExportedPipeline.from_folder <adaptive_depth.export_pipeline.ExportedPipeline.from_folder>`
    (raw text). The output folder is checked before any work (:func:`check_output_dir`), written
    under a temporary name and renamed at the end, so a failed export leaves nothing behind.

    Args:
        encoder: the wrapped model, in the dtype and on the device to export from (moved to eval mode).
        out_dir: a folder that does not exist yet (missing parent folders are created).
        format: ``"onnx"`` (needs ``pip install adaptive_depth[export]``) or ``"torch-export"``.
        criterion: exit criterion of the operating point (default: the encoder's saved one,
            ``encoder.adaptive_config.make_criterion()``).
        gate_threshold: skip when ``p_skip >= gate_threshold`` (1.0 never skips); ``None``: the
            encoder's own (``encoder.adaptive_config.gate_threshold``).
        mode: ``"adaptive"``, ``"skip_only"``, ``"exit_only"`` or ``"full"`` (see the engine); it
            decides which graphs are written (an ``"adaptive"`` export can also run the other modes).
        tokenizer: saved in the folder, so that it classifies raw text.
        opset: ONNX opset (``None``: torch.onnx's default).
        example_length: sequence length of the example inputs traced (the exported graphs accept
            1 to the position table's length of tokens and any row count).
        verbose: let the exporters print their warnings; by default they are collected into
            ``export.log`` in the folder (none of them needs action; on an error they are printed).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown ``format`` or ``mode``, a gated mode on an encoder without gates, an
            attention implementation other than sdpa/eager, a criterion class that is not built in,
            a bfloat16 or float64 encoder exported to ONNX (ONNX Runtime's CPU kernels do not run it).
        FileExistsError: ``out_dir`` exists.
        ExportStorageError: ``out_dir`` cannot be written (read-only, under a file, disk full).
        UnsupportedModelError: a model family the exporter does not know.
        ModuleNotFoundError: ``format="onnx"`` without onnx / onnxscript installed.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...                             num_attention_heads=4, intermediate_size=37))
        >>> encoder = AdaptiveEncoder(bert, num_labels=2, gate_inner_size=16, head_inner_size=16)
        >>> import tempfile; folder = Path(tempfile.mkdtemp()) / "exported"
        >>> sorted(p.name for p in export_engine(encoder, folder, "torch-export").iterdir())[:3]
        ['embeddings.pt2', 'export.log', 'gate_0.pt2']
    """
    if not isinstance(encoder, AdaptiveEncoder):
        raise TypeError(f"export_engine exports an AdaptiveEncoder, got {type(encoder).__name__}.")
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if mode not in MODES:
        raise ValueError(f"mode must be 'adaptive', 'skip_only', 'exit_only' or 'full', got {mode!r}.")
    if mode in ("adaptive", "skip_only") and not encoder.has_gates:
        raise ValueError(
            f"mode {mode!r} needs skip gates, but the encoder was built with_gates=False; "
            "export with mode='exit_only' or 'full'."
        )
    saved = encoder.adaptive_config
    gate_threshold = saved.gate_threshold if gate_threshold is None else check_gate_threshold(gate_threshold)
    criterion_spec = criterion_record(criterion if criterion is not None else saved.make_criterion())
    config = encoder.config
    if config.model_type not in EXPORT_EMBEDDINGS:
        raise UnsupportedModelError(
            f"exporting model_type {config.model_type!r} is not supported; "
            f"supported: {', '.join(sorted(EXPORT_EMBEDDINGS))}."
        )
    dtype = next(encoder.parameters()).dtype
    if format == "onnx" and dtype in (torch.bfloat16, torch.float64):
        raise ValueError(
            f"ONNX Runtime's CPU kernels do not run {str(dtype).removeprefix('torch.')} graphs of these layers (the "
            "export would not load); export a float32 or float16 copy (encoder.float()), or use "
            "format='torch-export'."
        )
    if format == "onnx":
        for package in ("onnx", "onnxscript"):
            try:
                __import__(package)
            except ModuleNotFoundError as error:
                raise ModuleNotFoundError(
                    f"format='onnx' needs {package}: pip install 'adaptive_depth[export]'."
                ) from error
    out_dir = check_output_dir(out_dir)
    max_tokens = encoder.adapter.max_tokens(config)  # the one owner of the per-family position limit
    truncation = saved.max_length or max_tokens
    if tokenizer is not None:
        from adaptive_depth.text_pipeline import truncation_length

        truncation = truncation_length(saved.max_length, max_tokens, tokenizer)
    try:
        staging = staging_folder(out_dir)
    except OSError as error:
        raise (storage_error(error, out_dir) or error) from None
    try:
        with quiet_exporters(verbose) as messages, torch.no_grad():
            files = _write_graphs(encoder.eval(), staging, format, mode, max_tokens, opset, example_length)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "format": format,
            "model_type": config.model_type,
            "attn_implementation": getattr(config, "_attn_implementation", None) or "eager",
            "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
            "device": str(next(encoder.parameters()).device),
            "num_steps": encoder.num_steps,
            "num_labels": encoder.num_labels,
            "problem_type": saved.problem_type,
            "label_names": saved.label_names,
            "text_pair": saved.text_pair,
            "hidden_size": int(config.hidden_size),
            "vocab_size": int(config.vocab_size),  # ids outside the tables are refused (ONNX would wrap negative ones)
            "type_vocab_size": getattr(config, "type_vocab_size", None),
            "max_tokens": max_tokens,
            "max_length": truncation,
            "tokenizer": tokenizer is not None,
            **files,
            "mode": mode,
            "gate_threshold": gate_threshold,
            "criterion": criterion_spec,
            "exact_macs": cost_record(encoder, max_tokens or 512),
            "torch_version": torch.__version__,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / LOG_NAME).write_text("".join(f"{line}\n" for line in messages))
        staging.rename(out_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        converted = storage_error(error, out_dir)
        if converted is not None:
            raise converted from error
        raise
    return out_dir


def _write_graphs(encoder: AdaptiveEncoder, folder: Path, export_format: str, mode: str, max_tokens: int | None,
                  opset: int | None, example_length: int) -> dict[str, Any]:
    """Export the steps ``mode`` needs into ``folder``; returns the manifest's file entries."""
    config, adapter, base_model = encoder.config, encoder.adapter, encoder.backbone
    parameter = next(encoder.parameters())
    dtype, device = parameter.dtype, parameter.device
    suffix = EXPORT_FORMATS[export_format]
    length = min(max(example_length, 2), max_tokens or example_length)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, int(config.vocab_size), (2, length), generator=generator).to(device)
    mask = torch.ones(2, length, dtype=torch.long, device=device)
    mask[1, length // 2:] = 0
    hidden = torch.randn(2, length, int(config.hidden_size), generator=generator, dtype=dtype).to(device)
    steps = encoder.num_steps
    layer_index = [adapter.module_index(config, step) for step in range(steps)]
    uses_gates, uses_exits = mode in ("adaptive", "skip_only"), mode in ("adaptive", "exit_only")

    def export(module: nn.Module, example: dict[str, Tensor], output: str, name: str) -> str:
        _export_one(module.eval(), example, output, folder / f"{name}{suffix}", export_format, max_tokens, opset)
        return f"{name}{suffix}"

    embedding = EmbeddingStep(base_model)
    example = {"input_ids": input_ids}
    if embedding.takes_token_types:
        example["token_type_ids"] = torch.zeros_like(input_ids)
    step_inputs = {"hidden_states": hidden, "attention_mask": mask}
    layers = adapter.layer_list(base_model)
    # MPNet's layers take the relative position bias its encoder computes (BACKBONES: batched_extra_args).
    position_bias = base_model.encoder if adapter.batched_extra_args else None
    attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    layer_files = {index: export(LayerStep(layers[index], attn_implementation, dtype, position_bias), step_inputs,
                                 "layer_output", f"layer_{index}") for index in sorted(set(layer_index))}
    return {
        "embedding_inputs": list(example),
        "embeddings": export(embedding, example, "hidden_states", "embeddings"),
        "layers": [layer_files[index] for index in layer_index],
        "gates": [export(GateStep(encoder.gates[i]), step_inputs, "p_skip", f"gate_{i}") for i in range(steps)]
        if uses_gates else [],
        # full and skip_only answer with the last head only
        "heads": [export(HeadStep(encoder.exit_heads[i]), step_inputs, "logits", f"head_{i}")
                  if uses_exits or i == steps - 1 else None for i in range(steps)],
    }


CRITERION_NAMES: tuple[str, ...] = get_args(CriterionName)


def _operating_point(encoder: AdaptiveEncoder, args: argparse.Namespace) -> tuple[ExitCriterion, float, str]:
    """The saved operating point (``encoder.adaptive_config``), with the command line's overrides."""
    saved = encoder.adaptive_config
    threshold = saved.threshold if args.threshold is None else args.threshold
    if args.criterion is None or args.criterion == saved.criterion:  # keep the saved criterion's options
        criterion = criterion_with_threshold(saved.make_criterion(), threshold)
    else:
        criterion = criterion_from_name(args.criterion, threshold)
    gate_threshold = saved.gate_threshold if args.gate_threshold is None else args.gate_threshold
    return criterion, gate_threshold, args.mode or str(saved.mode)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_depth.export",
        description="Export a saved AdaptiveEncoder (AdaptiveEncoder.save_pretrained) as step graphs, a manifest "
                    "and its tokenizer: a folder that ExportedPipeline.from_folder(OUT_DIR) runs on raw text.",
    )
    parser.add_argument("model_dir", help="folder written by AdaptiveEncoder.save_pretrained")
    parser.add_argument("out_dir", help="new folder for the exported graphs (must not exist; missing parents are created)")
    parser.add_argument("--format", required=True, choices=list(EXPORT_FORMATS), help="onnx or torch-export")
    parser.add_argument("--criterion", default=None, choices=CRITERION_NAMES,
                        help="exit criterion (default: the saved config's)")
    parser.add_argument("--threshold", type=float, default=None, help="exit threshold (default: the saved config's)")
    parser.add_argument("--gate-threshold", type=float, default=None,
                        help="skip when p_skip >= this (default: the saved config's, else 0.5)")
    parser.add_argument("--mode", default=None, choices=["adaptive", "skip_only", "exit_only", "full"],
                        help="engine mode (default: the saved config's, else adaptive with gates, exit_only without)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the SHA-256 check of the model's files (after a deliberate edit)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the exporters' warnings (default: collected into OUT_DIR/export.log)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 on a usage error)."""
    args = parse_args(argv)
    try:
        check_output_dir(args.out_dir)  # before loading anything
        from adaptive_depth.pretrained import resolve_model_dir
        from adaptive_depth.text_pipeline import folder_tokenizer

        folder = resolve_model_dir(args.model_dir)  # a Hub id or ~/...: the tokenizer is looked for there too
        encoder = AdaptiveEncoder.from_pretrained(folder, verify=not args.no_verify)
        tokenizer = folder_tokenizer(folder)
        criterion, gate_threshold, mode = _operating_point(encoder, args)
        out_dir = export_engine(encoder, args.out_dir, args.format, criterion=criterion, tokenizer=tokenizer,
                                gate_threshold=gate_threshold, mode=mode, opset=args.opset, verbose=args.verbose)
    except (ValueError, FileExistsError, FileNotFoundError, ExportStorageError, ModuleNotFoundError,
            TimeoutError) as error:  # TimeoutError: a Hub id that did not resolve in time
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir} ({args.format}, mode={mode}, gate_threshold={gate_threshold}, {criterion})")
    hidden = len((out_dir / LOG_NAME).read_text().splitlines())
    if hidden:
        print(f"{hidden} export warnings (none needs action) are in {out_dir / LOG_NAME}; --verbose prints them")
    if tokenizer is None:
        print(f"note: {args.model_dir} holds no tokenizer, so the export runs on token ids (ExportedEngine) but not "
              "on raw text; save the model with save_pretrained(folder, tokenizer=...) to include one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
