"""``AdaptiveEncoderConfig``: everything needed to rebuild an :class:`~adaptive_depth.AdaptiveEncoder`
around its backbone, and the operating point it was calibrated for.

Saved as ``adaptive_config.json`` beside the backbone by
:meth:`AdaptiveEncoder.save_pretrained <adaptive_depth.AdaptiveEncoder.save_pretrained>`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from adaptive_depth.classifiers import check_last_head
from adaptive_depth.exits import EntropyExit, ExitCriterion, MaxProbExit, PatienceExit, ToleranceExit
from adaptive_depth.files import write_atomically

__all__ = ["CONFIG_FORMAT_VERSION", "DEFAULT_THRESHOLDS", "METRICS", "AdaptiveEncoderConfig", "CriterionName",
           "check_criterion_fits", "check_gate_threshold", "criterion_from_name", "criterion_spec",
           "criterion_with_threshold", "label_ids"]

# The format of adaptive_config.json that this version writes (2: with ``criterion_options``). It reads
# format 1 too: the same fields without ``criterion_options``, which then are the criteria's defaults, as
# format 1 rebuilt them (the fields added since have defaults that describe the models saved before them).
CONFIG_FORMAT_VERSION = 2
_READABLE_FORMAT_VERSIONS = (1, 2)

CriterionName = Literal["entropy", "normalized_entropy", "max_prob", "patience", "tolerance"]
ProblemType = Literal["single_label_classification", "regression"]
_MODES = ("adaptive", "skip_only", "exit_only", "full")
# The task metrics a saved model can name (AdaptiveEncoderConfig.metric), and the problem type each fits
# (adaptive_depth.metrics.task_metric computes them): F1 is the binary F1 of class 1 (GLUE's MRPC, QQP).
METRICS: dict[str, str] = {"accuracy": "single_label_classification", "f1": "single_label_classification",
                           "mcc": "single_label_classification", "pearson": "regression", "spearman": "regression"}


# The options each criterion takes besides its threshold (the other fields of its class).
CRITERION_OPTIONS: dict[str, tuple[str, ...]] = {"patience": ("regression_tolerance",), "tolerance": ("patience",)}


def _check_criterion_name(name: str) -> None:
    if name not in get_args(CriterionName):
        known = ", ".join(map(repr, get_args(CriterionName)))
        raise ValueError(f"unknown exit criterion {name!r}; use one of {known}.")


def criterion_from_name(name: str, threshold: float, options: Mapping[str, float] | None = None) -> ExitCriterion:
    """The exit criterion ``name`` at ``threshold``.

    Args:
        name: ``"entropy"`` (nats), ``"normalized_entropy"`` (fraction of ``log C``, FastBERT's
            "speed"), ``"max_prob"``, ``"patience"`` (an integer number of heads) or ``"tolerance"``
            (regression: :class:`~adaptive_depth.exits.ToleranceExit`, the threshold in score units).
        threshold: the criterion's threshold.
        options: the criterion's other fields, as :func:`criterion_spec` returns them:
            ``{"regression_tolerance": ...}`` for ``"patience"``, ``{"patience": ...}`` (a whole
            number) for ``"tolerance"``; the other criteria take none. Missing: the class default.

    Raises:
        ValueError: an unknown name, a fractional patience, or an option the criterion does not take.

    Example:
        >>> criterion_from_name("entropy", 0.4)
        EntropyExit(threshold=0.4, normalized=False)
        >>> criterion_from_name("tolerance", 0.2, {"patience": 2})
        ToleranceExit(tolerance=0.2, patience=2)
    """
    options = dict(options or {})
    _check_criterion_name(name)
    allowed = CRITERION_OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"the {name!r} exit criterion takes no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(map(repr, allowed)) or 'none'}.")
    if name == "entropy":
        return EntropyExit(threshold)
    if name == "normalized_entropy":
        return EntropyExit(threshold, normalized=True)
    if name == "max_prob":
        return MaxProbExit(threshold)
    if name == "patience":
        return PatienceExit(_whole(threshold, "the patience criterion's threshold"),
                            **{key: float(value) for key, value in options.items()})
    if "patience" in options:
        options["patience"] = _whole(options["patience"], "the tolerance criterion's patience option")
    return ToleranceExit(threshold, **options)  # type: ignore[arg-type]


# The default operating point's threshold for each default criterion: placeholders until calibrated.
DEFAULT_THRESHOLDS: dict[str, float] = {"entropy": 0.3, "tolerance": 0.1}
_CLASS_CRITERIA = ("entropy", "normalized_entropy", "max_prob")


def check_criterion_fits(name: str, problem_type: str | None) -> None:
    """Refuse a criterion that cannot decide on this kind of output.

    Raises:
        ValueError: ``"entropy"``, ``"normalized_entropy"`` or ``"max_prob"`` for regression (one
            output has no class distribution), ``"tolerance"`` for classes.
    """
    if problem_type == "regression" and name in _CLASS_CRITERIA:
        raise ValueError(f"the {name!r} exit criterion needs classes; this is a regression model (one output): use "
                         "'tolerance' (heads agreeing within a score tolerance) or 'patience'.")
    if problem_type == "single_label_classification" and name == "tolerance":
        raise ValueError("the 'tolerance' exit criterion is for regression (one output); for classes use "
                         "'entropy', 'normalized_entropy', 'max_prob' or 'patience'.")


def criterion_spec(criterion: ExitCriterion) -> tuple[CriterionName, float, dict[str, float]]:
    """``(name, threshold, options)`` of a built-in criterion: the inverse of :func:`criterion_from_name`.

    Example:
        >>> criterion_spec(PatienceExit(3, regression_tolerance=0.2))
        ('patience', 3.0, {'regression_tolerance': 0.2})

    Raises:
        TypeError: a criterion class that is not built in (it has no name to save).
    """
    if isinstance(criterion, EntropyExit):
        return ("normalized_entropy" if criterion.normalized else "entropy"), criterion.threshold, {}
    if isinstance(criterion, MaxProbExit):
        return "max_prob", criterion.threshold, {}
    if isinstance(criterion, PatienceExit):
        return "patience", float(criterion.patience), {"regression_tolerance": criterion.regression_tolerance}
    if isinstance(criterion, ToleranceExit):
        return "tolerance", criterion.tolerance, {"patience": criterion.patience}
    raise TypeError(
        f"{type(criterion).__name__} is not a built-in exit criterion (EntropyExit, MaxProbExit, PatienceExit, "
        "ToleranceExit), so it has no name to save or calibrate by."
    )


def criterion_with_threshold(criterion: ExitCriterion, threshold: float) -> ExitCriterion:
    """``criterion`` at another threshold, with its other fields kept.

    Example:
        >>> criterion_with_threshold(PatienceExit(3, regression_tolerance=0.2), 1)
        PatienceExit(patience=1, regression_tolerance=0.2)
    """
    name, _, options = criterion_spec(criterion)
    return criterion_from_name(name, threshold, options)


def check_gate_threshold(value: float) -> float:
    """``value`` as a float if it is a valid gate threshold (in ``[0, 1]``), else a ``ValueError``.

    The one range check of the gate threshold: a layer is skipped when ``p_skip >= value``; 1.0
    never skips and 0.0 skips every layer (:func:`adaptive_depth.gates.skip_decision`). Its default
    is :attr:`AdaptiveEncoderConfig.gate_threshold`, which every engine and training forward uses
    unless given another value.

    Example:
        >>> check_gate_threshold(0.6)
        0.6
    """
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"gate_threshold must be in [0, 1] (a layer is skipped when p_skip >= it; 1 never skips), "
                         f"got {value}.")
    return value


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (``int`` is not ``bool``; ``float`` takes ``int``)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin is Union or origin is types.UnionType:
        return any(_has_type(value, arg) for arg in args)
    if origin is Literal:
        return isinstance(value, str) and value in args
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(key, args[0]) and _has_type(item, args[1])
                                               for key, item in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _whole(value: float, what: str) -> int:
    if value != int(value):
        raise ValueError(f"{what} is a whole number of heads, got {value}.")
    return int(value)


@dataclass
class AdaptiveEncoderConfig:
    """How the wrapper around a backbone is built, and how to run it.

    Architecture (the :class:`~adaptive_depth.AdaptiveEncoder` arguments):
        num_labels: classes per exit head (1 for regression).
        head_type, with_gates, gate_inner_size, gate_num_heads, gate_pooling, head_inner_size,
        head_num_heads, dropout, initial_skip_bias: as in :class:`~adaptive_depth.AdaptiveEncoder`.
        last_head: ``"exit_head"`` (a new head of ``head_type``) or ``"classifier:<model_type>"``: the
            fine-tuned model's own classifier (:meth:`~adaptive_depth.AdaptiveEncoder.from_classifier`;
            the folder then holds the whole ``*ForSequenceClassification``).

    Task:
        problem_type: ``"single_label_classification"`` or ``"regression"`` (default from
            ``num_labels``).
        label_names: one name per class (``None``: the class index is the label).
        max_length: truncation length for raw text (the length the model was trained at).
        metric: the task's metric, one of :data:`METRICS` (``"f1"`` for MRPC...), reported by
            ``predict`` beside accuracy; ``None``: accuracy (classification) or none.
        text_pair: whether the model reads text pairs (``True``), single texts (``False``) or
            unknown (``None``: no check); :class:`~adaptive_depth.AdaptivePipeline` refuses
            single texts for a pair model unless told ``allow_single_texts=True``.

    Operating point (what :class:`~adaptive_depth.AdaptivePipeline` runs by default):
        criterion: exit criterion name (see :func:`criterion_from_name`); one that decides on the
            model's outputs (``"entropy"``, ``"normalized_entropy"`` and ``"max_prob"`` need classes,
            ``"tolerance"`` one score). Default: ``"entropy"``, or ``"tolerance"`` for regression.
        threshold: its threshold. Default (:data:`DEFAULT_THRESHOLDS`): 0.3 nats for ``"entropy"``,
            0.1 score units for ``"tolerance"``; a placeholder until calibrated. Other criteria need one.
        criterion_options: its other fields (e.g. ``{"regression_tolerance": 0.1}`` for
            ``"patience"``); empty: the criterion's defaults. :meth:`set_criterion` fills all three.
        gate_threshold: a layer is skipped when ``p_skip >= gate_threshold`` (1.0: never).
        mode: engine mode (``"adaptive"``, ``"skip_only"``, ``"exit_only"``, ``"full"``);
            defaults to ``"adaptive"`` with gates and ``"exit_only"`` without.
        calibration: how the threshold was chosen, as :meth:`Calibration.to_dict
            <adaptive_depth.calibration.Calibration.to_dict>` wrote it (``None``: not calibrated).
        certificate: the certificate of the operating point, as :meth:`Certificate.to_dict
            <adaptive_depth.certificate.Certificate.to_dict>` wrote it (``None``: not certified;
            written by ``python -m adaptive_depth.calibrate`` and ``AdaptivePipeline.certify``).
        attn_implementation: the backbone's attention implementation when saved (set by
            ``save_pretrained``; the default of ``from_pretrained``).

    Example:
        >>> config = AdaptiveEncoderConfig(num_labels=2, label_names=["no", "yes"])
        >>> AdaptiveEncoderConfig.from_dict(config.to_dict()) == config
        True
    """

    num_labels: int
    problem_type: ProblemType | None = None
    label_names: list[str] | None = None
    max_length: int | None = None
    metric: str | None = None
    text_pair: bool | None = None
    head_type: Literal["attention", "pooler"] = "attention"
    last_head: str = "exit_head"
    with_gates: bool = True
    gate_inner_size: int = 128
    gate_num_heads: int = 2
    gate_pooling: Literal["attention", "cls", "mean"] = "attention"
    head_inner_size: int = 128
    head_num_heads: int = 4
    dropout: float = 0.1
    initial_skip_bias: float = 0.0
    criterion: CriterionName | None = None
    threshold: float | None = None
    criterion_options: dict[str, float] = field(default_factory=dict)
    gate_threshold: float = 0.5
    mode: str | None = None
    calibration: dict[str, Any] | None = field(default=None, compare=False)
    certificate: dict[str, Any] | None = field(default=None, compare=False)
    attn_implementation: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}.")
        for name in ("gate_inner_size", "gate_num_heads", "head_inner_size", "head_num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # a hand edit: not a raw error later
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
        if self.problem_type is None:
            self.problem_type = "regression" if self.num_labels == 1 else "single_label_classification"
        if self.problem_type not in ("single_label_classification", "regression"):
            raise ValueError(
                f"problem_type must be 'single_label_classification' or 'regression', got {self.problem_type!r}."
            )
        if (self.problem_type == "regression") != (self.num_labels == 1):
            raise ValueError(f"problem_type {self.problem_type!r} does not fit num_labels={self.num_labels}.")
        if self.label_names is not None:
            self.label_names = [str(name) for name in self.label_names]
            if len(self.label_names) != self.num_labels:
                raise ValueError(
                    f"label_names has {len(self.label_names)} names for num_labels={self.num_labels}."
                )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}.")
        if self.metric is not None and METRICS.get(self.metric) != self.problem_type:
            fitting = [name for name, problem in METRICS.items() if problem == self.problem_type]
            raise ValueError(f"metric {self.metric!r} is not a {self.problem_type} metric; use one of {fitting} or None.")
        if self.metric == "f1" and self.num_labels != 2:
            raise ValueError(f"metric 'f1' is the binary F1 of class 1; this model has {self.num_labels} classes.")
        if self.text_pair not in (None, True, False):
            raise ValueError(f"text_pair must be true, false or null (unknown), got {self.text_pair!r}.")
        if self.certificate is not None and not isinstance(self.certificate, Mapping):
            raise ValueError(f"certificate must be a mapping (Certificate.to_dict()) or null, got {self.certificate!r}.")
        if self.mode is None:
            self.mode = "adaptive" if self.with_gates else "exit_only"
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}.")
        if self.mode in ("adaptive", "skip_only") and not self.with_gates:
            raise ValueError(f"mode {self.mode!r} needs skip gates, but with_gates is False.")
        self.gate_threshold = check_gate_threshold(self.gate_threshold)
        check_last_head(self.last_head)
        if self.criterion is None:
            self.criterion = "tolerance" if self.problem_type == "regression" else "entropy"
        _check_criterion_name(self.criterion)
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS.get(self.criterion)
        if self.threshold is None:
            raise ValueError(f"the {self.criterion!r} exit criterion has no default threshold; give one.")
        check_criterion_fits(self.criterion, self.problem_type)
        if math.isnan(self.threshold):
            raise ValueError("threshold is NaN.")
        if not isinstance(self.criterion_options or {}, Mapping):
            raise ValueError(f"criterion_options must map option names to numbers, got {self.criterion_options!r}.")
        self.criterion_options = dict(self.criterion_options or {})
        self.make_criterion()  # validates criterion and threshold together

    def make_criterion(self) -> ExitCriterion:
        """The exit criterion of the operating point."""
        return criterion_from_name(self.criterion, self.threshold, self.criterion_options)

    def set_criterion(self, criterion: ExitCriterion) -> None:
        """Make ``criterion`` the operating point's (its name, threshold and options).

        Raises:
            ValueError: a criterion that cannot decide on this model's outputs (entropy for regression...).
        """
        name, threshold, options = criterion_spec(criterion)
        check_criterion_fits(name, self.problem_type)
        self.criterion, self.threshold, self.criterion_options = name, threshold, options

    def architecture_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~adaptive_depth.AdaptiveEncoder` (after the model)."""
        names = ("num_labels", "gate_inner_size", "gate_num_heads", "gate_pooling", "head_inner_size",
                 "head_num_heads", "dropout", "initial_skip_bias", "head_type", "with_gates", "last_head")
        return {name: getattr(self, name) for name in names}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``format_version``."""
        return {"format_version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdaptiveEncoderConfig:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            ValueError: an unknown key, or a format version this library does not read (a newer one,
                or none).
        """
        values = dict(values)
        version = values.pop("format_version", None)
        if version not in _READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            newer = isinstance(version, int) and not isinstance(version, bool) and version > CONFIG_FORMAT_VERSION
            advice = ("it was saved by a newer adaptive_depth: upgrade this one to load it" if newer else
                      "the file was not written by AdaptiveEncoder.save_pretrained, or was edited")
            readable = ", ".join(map(str, _READABLE_FORMAT_VERSIONS))
            raise ValueError(f"adaptive config format_version {version!r} is not one this adaptive_depth reads "
                             f"({readable}); {advice}.")
        if version == 1 and "criterion_options" in values:
            raise ValueError("format_version 1 has no field 'criterion_options'; the file was edited.")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in the adaptive config: {unknown}; known: {sorted(known)}.")
        missing = [f.name for f in fields if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"the adaptive config lacks the field(s) {missing}.")
        hints = get_type_hints(cls)
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                hint = hints[name]
                shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
                raise ValueError(f"field {name!r} of the adaptive config must be {shown}, got "
                                 f"{type(value).__name__} {value!r}.")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the JSON to ``path`` atomically (:func:`~adaptive_depth.files.write_atomically`), so
        that rewriting a saved model's config (``python -m adaptive_depth.calibrate``) never leaves
        half a file."""
        write_atomically(path, [json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"])

    @classmethod
    def load(cls, path: str | Path) -> AdaptiveEncoderConfig:
        """Read the JSON written by :meth:`save`.

        Raises:
            ValueError: the file is not a JSON object, or a field is unknown, missing, of the wrong
                type or out of range (the message starts with the path and names the field).
        """
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); the saved model is damaged.") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object.")
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: {error}") from error


def label_ids(config: AdaptiveEncoderConfig, labels: Sequence[Any]) -> list[int] | list[float]:
    """Gold labels as the model's class indices (or float scores for regression).

    A classification label may be the model's own label name (``config.label_names``, e.g.
    ``"not_entailment"``, or ``"0"``/``"1"``), or else a class index in ``[0, num_labels)``, as
    an integer or as text (``"1"`` in a TSV file); names win where both could apply. A regression
    label is a number or numeric text.

    Raises:
        ValueError: a label the model does not have (the message lists the model's labels).

    Example:
        >>> label_ids(AdaptiveEncoderConfig(num_labels=2, label_names=["no", "yes"]), ["yes", 0, "0"])
        [1, 0, 0]
    """
    if hasattr(labels, "tolist"):  # a tensor or an array
        labels = labels.tolist()
    if config.num_labels == 1:
        scores = []
        for index, value in enumerate(labels):
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(f"label {index + 1} is {value!r}, not a number; this is a regression model, "
                                 "whose labels are scores.") from None
        return scores
    names = config.label_names or [str(index) for index in range(config.num_labels)]
    by_name = {name: index for index, name in enumerate(names)}
    ids = []
    for index, value in enumerate(labels):
        if isinstance(value, str) and value in by_name:
            ids.append(by_name[value])
            continue
        # A class index, or one written as text ("0" in a TSV file).
        class_index = int(value) if isinstance(value, str) and value.strip().isdigit() else value
        if (isinstance(class_index, numbers.Integral) and not isinstance(class_index, bool)
                and 0 <= class_index < config.num_labels):
            ids.append(int(class_index))
        else:
            raise ValueError(f"label {index + 1} is {value!r}, which is not one of this model's labels: names "
                             f"{names} or class indices 0..{config.num_labels - 1}; is it the right label column?")
    return ids
