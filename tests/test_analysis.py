"""skip_statistics against brute-force Python references (and scipy / scikit-learn when installed)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_depth.analysis import average_ranks, quantile_bins, skip_statistics
from adaptive_depth.engine import AdaptiveInferenceEngine
from adaptive_depth.exits import EntropyExit
from tests.conftest import padded_batch, random_encoder

# --------------------------------------------------------------------------------------
# Independent references: plain Python loops over lists, no torch.
# --------------------------------------------------------------------------------------


def reference_ranks(values: list[float]) -> list[float]:
    ordered = sorted(values)
    ranks = []
    for value in values:
        positions = [index + 1 for index, other in enumerate(ordered) if other == value]
        ranks.append(sum(positions) / len(positions))
    return ranks


def reference_pearson(x: list[float], y: list[float]) -> float:
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y))
    spread_x = sum((a - mean_x) ** 2 for a in x)
    spread_y = sum((b - mean_y) ** 2 for b in y)
    if spread_x == 0 or spread_y == 0:
        return float("nan")
    return covariance / math.sqrt(spread_x * spread_y)


def reference_quantile(values: list[float], level: float) -> float:
    """numpy's default ("linear") quantile."""
    ordered = sorted(values)
    position = level * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])


def reference_bins(values: list[float], num_bins: int) -> list[int]:
    edges = [reference_quantile(values, k / num_bins) for k in range(1, num_bins)]
    return [sum(1 for edge in edges if edge < value) for value in values]


def reference_mutual_information(a: list[int], b: list[int]) -> float:
    n = len(a)
    joint, count_a, count_b = Counter(zip(a, b)), Counter(a), Counter(b)
    return sum(c / n * math.log(c * n / (count_a[x] * count_b[y])) for (x, y), c in joint.items())


def assert_close_or_both_nan(actual: float, expected: float, tolerance: float = 1e-9) -> None:
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, abs=tolerance)


skip_matrices = st.integers(1, 40).flatmap(
    lambda rows: st.integers(1, 7).flatmap(
        lambda layers: st.lists(
            st.lists(st.booleans(), min_size=layers, max_size=layers), min_size=rows, max_size=rows
        )
    )
)


@st.composite
def skips_and_difficulty(draw: st.DrawFn) -> tuple[list[list[bool]], list[float]]:
    rows = draw(skip_matrices)
    # Small integers make ties (shared ranks, shared bins); wide floats make none.
    values = st.one_of(
        st.integers(0, 4).map(float),
        st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
    )
    difficulty = draw(st.lists(values, min_size=len(rows), max_size=len(rows)))
    return rows, difficulty


@settings(max_examples=150, deadline=None)
@given(skips_and_difficulty(), st.integers(1, 6))
def test_matches_brute_force_reference(data: tuple[list[list[bool]], list[float]], num_bins: int) -> None:
    rows, difficulty = data
    stats = skip_statistics(torch.tensor(rows), torch.tensor(difficulty, dtype=torch.float64),
                            difficulty_bins=num_bins)
    patterns = Counter("".join("S" if skipped else "-" for skipped in row) for row in rows)
    expected_top = sorted(patterns.items(), key=lambda item: (-item[1], item[0]))[:5]
    skip_counts = [float(sum(row)) for row in rows]
    mean = sum(skip_counts) / len(rows)

    assert stats.num_rows == len(rows) and stats.num_layers == len(rows[0])
    assert stats.num_patterns == len(patterns)
    assert stats.top_patterns == expected_top
    assert stats.skip_rate_per_layer == pytest.approx(
        [sum(row[layer] for row in rows) / len(rows) for layer in range(len(rows[0]))]
    )
    assert stats.mean_skipped == pytest.approx(mean)
    assert stats.std_skipped == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in skip_counts) / len(rows)))
    assert_close_or_both_nan(stats.pearson, reference_pearson(skip_counts, difficulty))
    assert_close_or_both_nan(
        stats.spearman, reference_pearson(reference_ranks(skip_counts), reference_ranks(difficulty))
    )
    expected_mi = reference_mutual_information([int(c) for c in skip_counts], reference_bins(difficulty, num_bins))
    assert stats.mutual_information == pytest.approx(expected_mi, abs=1e-9)
    assert stats.difficulty_bins == num_bins


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 3).map(float), st.floats(-50, 50, width=32)), min_size=1, max_size=50),
       st.integers(1, 7))
def test_ranks_and_bins_match_references(values: list[float], num_bins: int) -> None:
    tensor = torch.tensor(values, dtype=torch.float64)
    assert average_ranks(tensor).tolist() == pytest.approx(reference_ranks(values))
    assert quantile_bins(tensor, num_bins).tolist() == reference_bins(values, num_bins)


@settings(max_examples=60, deadline=None)
@given(skips_and_difficulty(), st.randoms(use_true_random=False))
def test_row_order_does_not_matter(data: tuple[list[list[bool]], list[float]], random) -> None:
    rows, difficulty = data
    order = list(range(len(rows)))
    random.shuffle(order)
    first = skip_statistics(torch.tensor(rows), torch.tensor(difficulty, dtype=torch.float64)).to_dict()
    second = skip_statistics(torch.tensor([rows[i] for i in order]),
                             torch.tensor([difficulty[i] for i in order], dtype=torch.float64)).to_dict()
    for key, value in first.items():
        if isinstance(value, float):
            assert second[key] == pytest.approx(value, abs=1e-9), key
        elif key == "skip_rate_per_layer":
            assert second[key] == pytest.approx(value), key
        else:
            assert second[key] == value, key


@settings(max_examples=60, deadline=None)
@given(skips_and_difficulty())
def test_mutual_information_is_bounded_by_either_entropy(data: tuple[list[list[bool]], list[float]]) -> None:
    rows, difficulty = data
    stats = skip_statistics(torch.tensor(rows), torch.tensor(difficulty, dtype=torch.float64))
    counts = Counter(sum(row) for row in rows).values()
    entropy_of_skip_count = -sum(c / len(rows) * math.log(c / len(rows)) for c in counts)
    assert 0.0 <= stats.mutual_information <= min(entropy_of_skip_count, math.log(5)) + 1e-12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.lists(st.booleans(), min_size=1, max_size=8), st.integers(0, 2**31))
def test_a_static_pattern_has_one_pattern_and_no_information(rows: int, pattern: list[bool], seed: int) -> None:
    difficulty = torch.rand(rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    stats = skip_statistics(torch.tensor([pattern] * rows), difficulty)
    assert stats.num_patterns == 1
    assert stats.top_patterns == [("".join("S" if s else "-" for s in pattern), rows)]
    assert stats.std_skipped == 0.0
    assert stats.mutual_information == 0.0
    assert math.isnan(stats.spearman) and math.isnan(stats.pearson)
    as_dict = stats.to_dict()
    assert as_dict["spearman"] is None and as_dict["pearson"] is None
    json.dumps(as_dict, allow_nan=False)


def test_skip_count_that_follows_difficulty_exactly() -> None:
    """Harder rows skip fewer layers, one bin per skip count: correlation -1, MI = log(5)."""
    rows = [[layer < 4 - level for layer in range(6)] for level in range(5) for _ in range(4)]
    difficulty = torch.tensor([float(level) for level in range(5) for _ in range(4)])
    stats = skip_statistics(torch.tensor(rows), difficulty)
    assert stats.spearman == pytest.approx(-1.0) and stats.pearson == pytest.approx(-1.0)
    assert stats.mutual_information == pytest.approx(math.log(5))
    assert stats.num_patterns == 5 and stats.top_patterns[0] == ("------", 4)  # ties: "-" sorts before "S"


def test_without_difficulty_the_difficulty_fields_are_none() -> None:
    stats = skip_statistics(torch.tensor([[True, False], [False, False]]))
    assert (stats.spearman, stats.pearson, stats.mutual_information, stats.difficulty_bins) == (None,) * 4
    assert stats.to_dict()["top_patterns"] == [["--", 1], ["S-", 1]]


def test_top_k_limits_the_patterns() -> None:
    rows = torch.tensor([[bool(i & 1), bool(i & 2), bool(i & 4)] for i in range(8)] * 2 + [[True] * 3])
    stats = skip_statistics(rows, top_k=2)
    assert stats.num_patterns == 8
    assert stats.top_patterns == [("SSS", 3), ("---", 2)]


def test_scipy_and_sklearn_agree_on_a_real_engine_trace() -> None:
    """A trace of the real engine (random gates) against scipy.stats and sklearn's mutual_info_score."""
    stats_module = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    skipped, difficulty = [], []
    for seed in range(4):
        encoder = random_encoder("bert", seed, num_layers=4)
        input_ids, attention_mask = padded_batch(batch_size=6, num_tokens=11, seed=seed)
        out = AdaptiveInferenceEngine(encoder, EntropyExit(0.9))(input_ids, attention_mask)
        skipped.append(out.layers_skipped)
        difficulty.append(torch.distributions.Categorical(logits=out.logits).entropy())
    layers_skipped, difficulty_values = torch.cat(skipped), torch.cat(difficulty)
    stats = skip_statistics(layers_skipped, difficulty_values)
    counts = layers_skipped.sum(dim=1).numpy()
    assert stats.num_patterns > 1
    assert stats.spearman == pytest.approx(stats_module.spearmanr(counts, difficulty_values.numpy())[0], abs=1e-9)
    assert stats.pearson == pytest.approx(stats_module.pearsonr(counts, difficulty_values.numpy())[0], abs=1e-9)
    bins = quantile_bins(difficulty_values, 5).numpy()
    assert stats.mutual_information == pytest.approx(metrics.mutual_info_score(counts, bins), abs=1e-9)


@pytest.mark.parametrize(
    ("layers_skipped", "difficulty", "match"),
    [
        (torch.zeros(4, dtype=torch.bool), None, r"\[N, L\]"),
        (torch.zeros(0, 3, dtype=torch.bool), None, r"N >= 1"),
        (torch.tensor([[0, 2]]), None, "0/1"),
        (torch.zeros(3, 2, dtype=torch.bool), torch.zeros(2), r"\[N\] = \[3\]"),
        (torch.zeros(2, 2, dtype=torch.bool), torch.tensor([0.0, float("nan")]), "NaN or infinite"),
    ],
)
def test_bad_input_says_what_was_wrong(layers_skipped, difficulty, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        skip_statistics(layers_skipped, difficulty)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="top_k"):
        skip_statistics(torch.zeros(2, 2, dtype=torch.bool), top_k=0)
    with pytest.raises(ValueError, match="difficulty_bins"):
        skip_statistics(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2), difficulty_bins=0)
