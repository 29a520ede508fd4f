"""Run an exported engine: :class:`ExportedEngine` loads the folder written by
:func:`adaptive_depth.export.export_engine` and runs the static-shape step graphs with one of
two backends, ``torch.export`` programs (``.pt2``) or ONNX Runtime sessions (``.onnx``). Its loop
is the one of :class:`adaptive_depth.engine.AdaptiveInferenceEngine` (active-row compaction, the
last head answers for the rows still there), so it takes the same decisions; the inputs are
checked as the eager engine checks them (:func:`adaptive_depth.inputs.check_batch`), and the
trace carries the exact-convention MACs of what ran, from the manifest.

ONNX Runtime runs on the caller's thread budget (``num_threads``, else torch's current count) with
its threads' spin-waiting off, so that torch work in the same process keeps its speed.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_depth.config import check_gate_threshold
from adaptive_depth.engine import ExitTrace, skip_exit_loop
from adaptive_depth.exits import ExitCriterion, predictions_from_logits
from adaptive_depth.export_files import MANIFEST_VERSION, criterion_from_record, quadratic_at
from adaptive_depth.inputs import check_batch

__all__ = ["ExportedEngine", "ExportedEngineOutput", "onnx_session_options"]

StepFunction = Callable[..., Tensor]
_MODES = ("adaptive", "skip_only", "exit_only", "full")


@dataclass
class ExportedEngineOutput(ExitTrace):
    """What :class:`ExportedEngine` returns: the :class:`~adaptive_depth.engine.ExitTrace` fields and
    what the rows cost (exact convention: every matmul at the row's real length).

    Attributes:
        num_tokens: ``[B]`` real (unpadded) length of each row.
        macs_exact: ``[B]`` int64 MACs of what ran.
        full_macs_exact: ``[B]`` the same rows at full depth (every layer and the last head, no gate).
    """

    num_tokens: Tensor
    macs_exact: Tensor
    full_macs_exact: Tensor


def _torch_export_step(path: Path) -> StepFunction:
    """The program as a module without per-call input validation, and without eval-mode no-ops.

    The unlifted module checks its inputs' shapes and dtypes against the program's guards on every
    call (about 0.25 ms on a CPU, 19 calls per row at batch 1 for a 6-layer model): the engine
    checks the inputs once instead (:func:`adaptive_depth.inputs.check_batch`). Dropout in eval
    mode and tensor-metadata asserts are dispatched ops that do nothing at inference; they are
    taken out of the graph.
    """
    module = torch.export.load(str(path)).module(check_guards=False)
    module.validate_inputs = False
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.dropout.default and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    module.recompile()
    return module


def onnx_session_options(num_threads: int | None = None) -> Any:
    """ONNX Runtime session options that share the CPU with torch in one process.

    ``intra_op_num_threads`` is ``num_threads`` (``None``: torch's current
    ``torch.get_num_threads()``), ``inter_op_num_threads`` 1, and spin-waiting is off: with it on,
    ORT's idle threads keep spinning after a call and slow later torch work on the same cores.

    Example:
        >>> options = onnx_session_options(2)  # doctest: +SKIP
        >>> options.intra_op_num_threads, options.get_session_config_entry("session.intra_op.allow_spinning")  # doctest: +SKIP
        (2, '0')
    """
    try:
        import onnxruntime
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "running an ONNX export needs onnxruntime: pip install 'adaptive_depth[export]'."
        ) from error
    threads = torch.get_num_threads() if num_threads is None else int(num_threads)
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1 (or None: torch's thread count), got {num_threads}.")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _onnx_step(path: Path, options: Any) -> StepFunction:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]

    def run(**inputs: Tensor) -> Tensor:
        # ONNX Runtime may drop an input the graph does not read; feed only the declared ones.
        feed = {name: inputs[name].contiguous().numpy() for name in names}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def _check_ids(name: str, ids: Tensor, table_size: int | None) -> None:
    """Refuse ids outside ``[0, table_size)`` (``None``: unknown, no check). ONNX Runtime's Gather wraps a
    negative id to the end of the embedding table and answers; the eager engine raises an IndexError."""
    if table_size is None:
        return
    outside = (ids < 0) | (ids >= table_size)
    if bool(outside.any()):
        values = sorted(set(ids[outside].tolist()))
        raise ValueError(f"{name} must lie in [0, {table_size}) (the model's embedding table); got "
                         f"{values[:5]}{' ...' if len(values) > 5 else ''}. Use the exported folder's tokenizer.")


class ExportedEngine:
    """The adaptive engine over exported step graphs, with its operating point from the manifest.

    Args:
        folder: a folder written by :func:`adaptive_depth.export.export_engine`.
        num_threads: ONNX Runtime intra-op threads (``None``: torch's current thread count, read
            when the engine is built); ``torch.export`` programs use torch's threads.
        mode: run another mode than the exported one, when its graphs are there (an
            ``"adaptive"`` export runs every mode; ``"exit_only"`` also ``"full"``).
        criterion, gate_threshold: override the manifest's operating point.

    Raises:
        FileNotFoundError: no manifest in ``folder``.
        ValueError: a manifest that is not JSON or of another version (re-export), or a ``mode``
            whose graphs the export does not hold.

    Example:
        >>> engine = ExportedEngine("exported-mrpc")  # doctest: +SKIP
        >>> out = engine(input_ids, attention_mask, token_type_ids)  # doctest: +SKIP
        >>> out.exit_layer, out.macs_exact  # doctest: +SKIP
    """

    def __init__(
        self,
        folder: str | Path,
        num_threads: int | None = None,
        *,
        mode: str | None = None,
        criterion: ExitCriterion | None = None,
        gate_threshold: float | None = None,
    ) -> None:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found; pass a folder written by adaptive_depth.export.export_engine."
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error}); the folder is damaged: re-export the model "
                             "(python -m adaptive_depth.export MODEL_DIR OUT_DIR).") from error
        if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
            version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
            raise ValueError(
                f"{manifest_path} has manifest_version {version!r}, this adaptive_depth reads version "
                f"{MANIFEST_VERSION}; re-export the model (python -m adaptive_depth.export MODEL_DIR OUT_DIR)."
            )
        self.folder = folder
        self.manifest = manifest
        self.format: str = manifest["format"]
        self.model_type: str = manifest["model_type"]
        self.num_steps: int = manifest["num_steps"]
        self.num_labels: int = manifest["num_labels"]
        self.max_tokens: int | None = manifest["max_tokens"]
        # Folders exported before these were recorded have no id check beyond the runtime's own.
        self.vocab_size: int | None = manifest.get("vocab_size")
        self.type_vocab_size: int | None = manifest.get("type_vocab_size")
        self.embedding_inputs: list[str] = manifest["embedding_inputs"]
        self.session_options = onnx_session_options(num_threads) if self.format == "onnx" else None
        loaded: dict[str, StepFunction] = {}

        def load(name: str | None) -> StepFunction | None:
            if name is None:
                return None
            if name not in loaded:
                path = folder / name
                loaded[name] = (_onnx_step(path, self.session_options) if self.format == "onnx"
                                else _torch_export_step(path))
            return loaded[name]

        self.embeddings = load(manifest["embeddings"])
        self.layers = [load(name) for name in manifest["layers"]]
        self.gates = [load(name) for name in manifest["gates"]]
        self.heads = [load(name) for name in manifest["heads"]]
        cost = manifest["exact_macs"]
        embedding = [[value] + [0] * (self.num_steps - 1) for value in cost["embedding"]]
        # [3 lengths, 4 parts (embedding, layer, gate, head), L]: quadratic_at gives any length.
        self._cost = torch.tensor([[embedding[k], *(
            [row[k] for row in cost[part]] for part in ("layers", "gates", "heads"))] for k in range(3)],
            dtype=torch.long)
        self.mode = manifest["mode"]
        self.criterion = criterion_from_record(manifest["criterion"])
        self.gate_threshold = manifest["gate_threshold"]
        self.configure(mode=mode, criterion=criterion, gate_threshold=gate_threshold)

    def configure(self, *, mode: str | None = None, criterion: ExitCriterion | None = None,
                  gate_threshold: float | None = None) -> ExportedEngine:
        """Set another operating point (``None`` keeps the current value); returns ``self``.

        Raises:
            ValueError: an unknown mode, or one whose graphs the export does not hold.
        """
        if mode is not None:
            if mode not in _MODES:
                raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}.")
            if mode in ("adaptive", "skip_only") and not self.gates:
                raise ValueError(f"mode {mode!r} needs the gates, which this {self.manifest['mode']!r} export does "
                                 "not hold; export with mode='adaptive' to run every mode.")
            if mode in ("adaptive", "exit_only") and any(head is None for head in self.heads):
                raise ValueError(f"mode {mode!r} needs every exit head, which this {self.manifest['mode']!r} export "
                                 "does not hold; export with mode='adaptive' or 'exit_only'.")
            self.mode = mode
        if criterion is not None:
            self.criterion = criterion
        if gate_threshold is not None:
            self.gate_threshold = check_gate_threshold(gate_threshold)
        return self

    def with_operating_point(self, *, mode: str | None = None, criterion: ExitCriterion | None = None,
                             gate_threshold: float | None = None) -> ExportedEngine:
        """A copy at another operating point that shares the loaded graphs (no reload, no new sessions)."""
        return copy.copy(self).configure(mode=mode, criterion=criterion, gate_threshold=gate_threshold)

    @torch.inference_mode()
    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> ExportedEngineOutput:
        """Classify a batch, skipping and exiting per row.

        Args:
            input_ids: ``[B, N]`` token ids, ``N`` at most the position table's length.
            attention_mask: ``[B, N]``, 1 for tokens, 0 for padding, right padding only (``None``: no padding).
            token_type_ids: ``[B, N]`` segment ids (``None``: zeros); ignored by DistilBERT and MPNet.

        Raises:
            ValueError: the inputs the eager engine refuses, with the same message
                (:func:`adaptive_depth.inputs.check_batch`): too many tokens, an empty batch or
                row, a mask of another shape, left padding; and ids outside the embedding tables.
        """
        attention_mask, token_mask = check_batch(input_ids, attention_mask, {}, self.max_tokens, self.model_type)
        _check_ids("input_ids", input_ids, self.vocab_size)
        if token_type_ids is not None and "token_type_ids" in self.embedding_inputs:
            _check_ids("token_type_ids", token_type_ids, self.type_vocab_size)
        mask = attention_mask.long()
        inputs = {"input_ids": input_ids.long(), "token_type_ids": (
            torch.zeros_like(mask) if token_type_ids is None else token_type_ids.long())}
        hidden = self.embeddings(**{name: inputs[name] for name in self.embedding_inputs})
        lengths = token_mask.sum(dim=-1)
        padded = not bool(token_mask.all())  # then the padding is cut as rows leave, as in the eager engine
        trace = skip_exit_loop(_ExportedRows(self, mask), hidden, num_steps=self.num_steps, num_labels=self.num_labels,
                               mode=self.mode, criterion=self.criterion, gate_threshold=self.gate_threshold,
                               lengths=lengths.tolist() if padded else None)
        macs, full_macs = self._macs(lengths, trace.layers_run, trace.gates_run, trace.heads_run)
        return ExportedEngineOutput(
            logits=trace.logits,
            predictions=predictions_from_logits(trace.logits),
            exit_layer=trace.exit_layer,
            layers_run=trace.layers_run,
            layers_skipped=trace.gates_run & ~trace.layers_run,
            heads_run=trace.heads_run,
            gates_run=trace.gates_run,
            num_tokens=lengths,
            macs_exact=macs,
            full_macs_exact=full_macs,
        )

    def _macs(self, lengths: Tensor, layers_run: Tensor, gates_run: Tensor, heads_run: Tensor) -> tuple[Tensor, Tensor]:
        """``([B], [B])`` exact MACs of what ran and of full depth, from the manifest's per-step counts."""
        lengths = lengths.cpu()[:, None, None]
        table = quadratic_at(tuple(self._cost), lengths)  # [B, 4, L]
        ran = torch.stack([torch.ones_like(layers_run), layers_run, gates_run, heads_run], dim=1).cpu()
        full = torch.zeros_like(ran[0])
        full[:2] = True  # embedding and every layer
        full[3, -1] = True  # the last head
        return (table * ran).sum((1, 2)), (table * full).sum((1, 2))

    def __repr__(self) -> str:
        return (f"ExportedEngine(format={self.format!r}, mode={self.mode!r}, steps={self.num_steps}, "
                f"gate_threshold={self.gate_threshold}, criterion={self.criterion!r})")


class _ExportedRows:
    """:class:`~adaptive_depth.engine.StepRows` over exported step graphs: the token mask is all they need."""

    def __init__(self, engine: ExportedEngine, mask: Tensor) -> None:
        self.engine, self.mask = engine, mask

    def select(self, rows: Tensor) -> _ExportedRows:
        return _ExportedRows(self.engine, self.mask.index_select(0, rows))

    def trim(self, length: int) -> _ExportedRows:
        return _ExportedRows(self.engine, self.mask[:, :length].contiguous())

    def gate(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.gates[step](hidden_states=hidden, attention_mask=self.mask)

    def layer(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.layers[step](hidden_states=hidden, attention_mask=self.mask)

    def head(self, step: int, hidden: Tensor) -> Tensor:
        return self.engine.heads[step](hidden_states=hidden, attention_mask=self.mask)
