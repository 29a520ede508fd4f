"""Criteria saved by name, threshold and options: ``criterion_spec`` inverts ``criterion_from_name``,
and a calibrated or saved operating point keeps a criterion's non-default fields."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adaptive_depth import AdaptiveEncoderConfig, EntropyExit, MaxProbExit, PatienceExit, ToleranceExit
from adaptive_depth.calibration import Calibration
from adaptive_depth.config import CONFIG_FORMAT_VERSION, criterion_from_name, criterion_spec, criterion_with_threshold

unit = st.floats(0.0, 1.0, allow_nan=False)
criteria = st.one_of(
    st.builds(EntropyExit, st.floats(0.0, 5.0, allow_nan=False), st.booleans()),
    st.builds(MaxProbExit, unit),
    st.builds(PatienceExit, st.integers(0, 12), st.floats(0.0, 3.0, allow_nan=False)),
    st.builds(ToleranceExit, st.floats(0.0, 10.0, allow_nan=False) | st.just(math.inf), st.integers(1, 12)),
)


@given(criteria)
def test_the_spec_rebuilds_the_same_criterion(criterion) -> None:
    name, threshold, options = criterion_spec(criterion)
    assert criterion_from_name(name, threshold, options) == criterion
    # through JSON, as adaptive_config.json stores it
    assert criterion_from_name(*json.loads(json.dumps([name, threshold, options]))) == criterion


@given(criteria, st.sampled_from([0.0, 1.0]))  # valid for every criterion
def test_another_threshold_keeps_the_other_fields(criterion, threshold: float) -> None:
    moved = criterion_with_threshold(criterion, threshold)
    name, value, options = criterion_spec(moved)
    assert (name, options) == criterion_spec(criterion)[::2] and value == threshold


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"'entropy' exit criterion takes no option 'patience'; its options: none"):
        criterion_from_name("entropy", 0.3, {"patience": 2})
    with pytest.raises(ValueError, match=r"takes no option 'tolerance'; its options: 'regression_tolerance'"):
        criterion_from_name("patience", 2, {"tolerance": 0.2})
    with pytest.raises(ValueError, match="patience option is a whole number"):
        criterion_from_name("tolerance", 0.2, {"patience": 1.5})
    with pytest.raises(ValueError, match="unknown exit criterion 'speed'"):
        criterion_from_name("speed", 0.2)
    with pytest.raises(TypeError, match="not a built-in exit criterion"):
        criterion_spec(object())  # type: ignore[arg-type]


def test_config_keeps_the_options_through_json_and_refuses_other_versions() -> None:
    config = AdaptiveEncoderConfig(num_labels=1)
    config.set_criterion(PatienceExit(2, regression_tolerance=0.25))
    assert (config.criterion, config.threshold, config.criterion_options) == ("patience", 2.0,
                                                                               {"regression_tolerance": 0.25})
    written = config.to_dict()
    assert written["format_version"] == CONFIG_FORMAT_VERSION == 2
    again = AdaptiveEncoderConfig.from_dict(json.loads(json.dumps(written)))
    assert again == config and again.make_criterion() == PatienceExit(2, regression_tolerance=0.25)
    for version, why in ((3, "saved by a newer adaptive_depth: upgrade"), (None, "not written by"),
                         (True, "not written by"), ("2", "not written by"), (0, "not written by")):
        with pytest.raises(ValueError, match=f"format_version {version!r} is not one this adaptive_depth reads "
                                             f"\\(1, 2\\); .*{why}"):
            AdaptiveEncoderConfig.from_dict({**written, "format_version": version})
    with pytest.raises(ValueError, match="format_version 1 has no field 'criterion_options'"):
        AdaptiveEncoderConfig.from_dict({**written, "format_version": 1})
    with pytest.raises(ValueError, match="takes no option 'patience'"):
        AdaptiveEncoderConfig(num_labels=2, criterion="entropy", criterion_options={"patience": 2})


def test_the_default_operating_point_fits_the_outputs_and_a_misfit_is_refused() -> None:
    """Entropy needs classes (the one output of a regression head has entropy 0, and `entropy` refuses it at
    inference): a regression model defaults to the tolerance criterion, and a misfit is refused up front."""
    classes = AdaptiveEncoderConfig(num_labels=3)
    assert (classes.criterion, classes.threshold) == ("entropy", 0.3)
    regression = AdaptiveEncoderConfig(num_labels=1)
    assert regression.make_criterion() == ToleranceExit(0.1)
    assert AdaptiveEncoderConfig(num_labels=1, threshold=0.4).make_criterion() == ToleranceExit(0.4)
    assert AdaptiveEncoderConfig(num_labels=1, criterion="patience", threshold=2).make_criterion() == PatienceExit(2)
    for name in ("entropy", "normalized_entropy", "max_prob"):
        with pytest.raises(ValueError, match=f"the '{name}' exit criterion needs classes; this is a regression"):
            AdaptiveEncoderConfig(num_labels=1, criterion=name, threshold=0.5)
    with pytest.raises(ValueError, match="'tolerance' exit criterion is for regression"):
        AdaptiveEncoderConfig(num_labels=2, criterion="tolerance", threshold=0.1)
    with pytest.raises(ValueError, match="'max_prob' exit criterion has no default threshold"):
        AdaptiveEncoderConfig(num_labels=2, criterion="max_prob")
    for criterion in (EntropyExit(0.2), MaxProbExit(0.9)):
        with pytest.raises(ValueError, match="needs classes"):
            regression.set_criterion(criterion)
    assert regression.make_criterion() == ToleranceExit(0.1)  # a refused set changes nothing


def test_a_calibration_rebuilds_the_calibrated_criterion() -> None:
    calibration = Calibration(criterion="tolerance", threshold=0.4, max_relative_cost=0.5, convention="exact",
                              relative_cost=0.5, relative_cost_exact=0.5, relative_cost_paper=0.5, mean_layers_run=3.0,
                              metric_name=None, metric=None, num_rows=4, criterion_options={"patience": 3})
    assert calibration.make_criterion() == ToleranceExit(0.4, patience=3)
