""":class:`Certificate`: a certified operating point and what it guarantees, in plain words.

Written by :func:`adaptive_depth.certify.certify_threshold`, stored in a saved model's
``adaptive_config.json`` (``AdaptiveEncoderConfig.certificate``) by
``python -m adaptive_depth.calibrate``, and printed by ``python -m adaptive_depth.predict``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptive_depth.config import criterion_from_name, criterion_spec
from adaptive_depth.exits import ExitCriterion

__all__ = ["RISKS", "Certificate", "GridPoint"]

# The risks a threshold can be certified for, and what each bounds (see certify_threshold).
RISKS: dict[str, str] = {
    "disagreement": "the rate at which this model's answers at {point} differ from its full-depth answers",
    "error_gap": "this model's error rate at {point} minus its full-depth error rate",
    "moved": "the rate at which this model's scores at {point} move by more than {tolerance:g} from its "
             "full-depth scores",
}


@dataclass(frozen=True)
class GridPoint:
    """One threshold of the grid, as the fixed-sequence test saw it on the calibration rows.

    Attributes:
        threshold: the exit threshold.
        empirical_risk: the risk measured on the calibration rows.
        p_value: the p-value of "risk > max_risk" at this threshold.
        relative_cost: total MACs over total full-depth MACs of the calibration rows.
        certified: whether the test rejected (every point before it was rejected too).
    """

    threshold: float
    empirical_risk: float
    p_value: float
    relative_cost: float
    certified: bool


@dataclass(frozen=True)
class Certificate:
    """A threshold certified by Learn-then-Test, with the evidence (see :meth:`statement`).

    Attributes:
        criterion, threshold, criterion_options: the certified exit criterion (see
            :func:`~adaptive_depth.config.criterion_from_name`).
        gate_threshold, mode: the engine's gate threshold and mode, which the certificate
            covers as well (another gate threshold or mode is another model).
        risk: ``"disagreement"``, ``"error_gap"`` or ``"moved"``.
        max_risk, delta: the risk level certified and the allowed probability of error.
        tolerance: for ``"moved"``, how far (score units) a score may move; else ``None``.
        n: calibration rows.
        empirical_risk: the risk on the calibration rows at ``threshold``.
        upper_bound: the ``(1 - delta)`` upper confidence bound of the risk at ``threshold``
            from the same p-value family (valid for this threshold taken alone; the guarantee
            that holds after the choice among thresholds is ``risk <= max_risk``).
        p_value, p_value_method: the p-value at ``threshold`` and how it was computed
            (``"binomial"`` or ``"hoeffding_bentkus"``).
        convention: the FLOPs convention of ``relative_cost`` and ``max_relative_cost``.
        relative_cost: total MACs over total full-depth MACs of the calibration rows at
            ``threshold``, in ``convention``; ``relative_cost_exact`` / ``_paper`` in both.
        max_relative_cost: the budget asked for, or ``None``.
        grid: every threshold tested, in test order (safest first), up to the first one not
            certified.
    """

    criterion: str
    threshold: float
    gate_threshold: float
    mode: str
    risk: str
    max_risk: float
    delta: float
    n: int
    empirical_risk: float
    upper_bound: float
    p_value: float
    p_value_method: str
    convention: str
    relative_cost: float
    relative_cost_exact: float
    relative_cost_paper: float
    criterion_options: dict[str, float] = field(default_factory=dict)
    tolerance: float | None = None
    max_relative_cost: float | None = None
    grid: tuple[GridPoint, ...] = ()

    def __post_init__(self) -> None:
        if self.risk not in RISKS:
            raise ValueError(f"unknown risk {self.risk!r}; certificates bound one of {', '.join(RISKS)}.")
        criterion_from_name(self.criterion, self.threshold, self.criterion_options)  # checks all three

    def make_criterion(self) -> ExitCriterion:
        """The certified exit criterion."""
        return criterion_from_name(self.criterion, self.threshold, self.criterion_options)

    def covers(self, criterion: ExitCriterion, gate_threshold: float, mode: str) -> bool:
        """Whether an engine with this criterion, gate threshold and mode is the one certified."""
        try:
            spec = criterion_spec(criterion)
        except TypeError:
            return False
        return (spec == (self.criterion, self.threshold, self.criterion_options)
                and gate_threshold == self.gate_threshold and mode == self.mode)

    def statement(self) -> str:
        """The guarantee in plain words.

        Example:
            >>> certificate = Certificate(criterion="entropy", threshold=0.2, gate_threshold=0.5, mode="adaptive",
            ...     risk="disagreement", max_risk=0.01, delta=0.05, n=1000, empirical_risk=0.002,
            ...     upper_bound=0.0063, p_value=0.0004, p_value_method="binomial", convention="exact",
            ...     relative_cost=0.41, relative_cost_exact=0.41, relative_cost_paper=0.43)
            >>> print(certificate.statement())  # doctest: +NORMALIZE_WHITESPACE
            With probability at least 1 - 0.05 over the draw of the 1000 calibration rows, the rate at which
            this model's answers at entropy threshold 0.2 (gate threshold 0.5, mode adaptive) differ from its
            full-depth answers on new rows from the same distribution is at most 0.01 (assumes calibration rows
            and future rows are exchangeable, e.g. drawn i.i.d. from the same source).
        """
        point = (f"{self.criterion} threshold {self.threshold:.6g} (gate threshold {self.gate_threshold:g}, "
                 f"mode {self.mode})")
        what = RISKS[self.risk].format(point=point, tolerance=self.tolerance or 0.0)
        return (f"With probability at least 1 - {self.delta:g} over the draw of the {self.n} calibration rows, {what} "
                f"on new rows from the same distribution is at most {self.max_risk:g} (assumes calibration rows and "
                "future rows are exchangeable, e.g. drawn i.i.d. from the same source).")

    def summary(self) -> str:
        """One line: the bound, its confidence, the rows and the cost."""
        moved = f" by more than {self.tolerance:g}" if self.risk == "moved" else ""
        return (f"certified: {self.risk}{moved} with full depth <= {self.max_risk:.3g} with probability >= "
                f"{1 - self.delta:.3g} (n={self.n} calibration rows, measured {self.empirical_risk:.4f}, upper bound "
                f"{self.upper_bound:.4f}); relative cost {self.relative_cost:.3f} there (total MACs / full-depth MACs, "
                f"{self.convention} convention)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``inf`` thresholds stay floats, which Python's json writes as ``Infinity``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Certificate:
        """Rebuild from :meth:`to_dict`'s output.

        Raises:
            ValueError: unknown or missing fields, or values that do not make a certificate.
        """
        known = {item.name for item in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown certificate fields {unknown}; known: {sorted(known)}.")
        values = dict(values)
        try:
            values["grid"] = tuple(GridPoint(**point) for point in values.get("grid", ()))
            certificate = cls(**values)
        except TypeError as error:
            raise ValueError(f"not a valid certificate: {error}") from error
        if not (0.0 < certificate.delta < 1.0 and 0.0 < certificate.max_risk < 1.0 and certificate.n >= 1
                and math.isfinite(certificate.upper_bound)):
            raise ValueError(f"not a valid certificate: delta {certificate.delta}, max_risk {certificate.max_risk}, "
                             f"n {certificate.n}, upper_bound {certificate.upper_bound}.")
        return certificate
