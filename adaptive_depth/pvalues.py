"""Valid p-values and confidence bounds for the mean of a bounded loss (no scipy).

:mod:`adaptive_depth.certify` tests, for each exit threshold, the null hypothesis "the risk is
above ``level``" from ``n`` i.i.d. (exchangeable) losses. Two p-values, both valid for every
``n`` (not asymptotic):

- :func:`binomial_p_value`, exact for a 0/1 loss: under the null the number of losses is at
  least a Binomial(n, level) draw, so ``P(Binomial(n, level) <= k)`` is a valid p-value.
- :func:`hoeffding_bentkus_p_value` (Bates, Angelopoulos, Lei, Malik, Jordan 2021,
  "Distribution-free, risk-controlling prediction sets", Proposition 3), valid for any loss in
  ``[0, 1]``: ``min(exp(-n h1(min(r, a), a)), e P(Binomial(n, a) <= ceil(n r)))``.

:func:`upper_confidence_bound` inverts either one: the smallest level that its p-value
rejects at ``delta``, a ``(1 - delta)`` upper confidence bound of the risk (the Clopper-Pearson
bound for the binomial p-value).

The binomial CDF is a float64 log-sum-exp over the probability mass, with ``lgamma`` for the
binomial coefficients: stable for ``n`` up to millions.
"""

from __future__ import annotations

import math

import torch

__all__ = ["binomial_cdf", "binomial_p_value", "check_risk_level", "hoeffding_bentkus_p_value",
           "upper_confidence_bound"]


def check_risk_level(value: float, name: str) -> float:
    """``value`` as a float if it lies in ``(0, 1)``, else a ``ValueError`` naming ``name``
    (the one range check of ``max_risk`` and ``delta``)."""
    value = float(value)
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in (0, 1), got {value}.")
    return value


def binomial_cdf(k: float, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)``, in float64.

    Args:
        k: the count (a fractional ``k`` means ``floor(k)``).
        n: trials, ``>= 0``.
        p: success probability in ``[0, 1]``.

    Example:
        >>> round(binomial_cdf(1, 3, 0.5), 6)
        0.5
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_cdf needs n >= 0 and p in [0, 1], got n={n}, p={p}.")
    top = math.floor(k)
    if top < 0:
        return 0.0
    if top >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    if top < 256:  # a few terms: plain floats beat tensor overheads
        terms = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
                 for i in range(top + 1)]
        largest = max(terms)
        return min(1.0, math.exp(largest) * math.fsum(math.exp(term - largest) for term in terms))
    counts = torch.arange(top + 1, dtype=torch.float64)
    log_mass = log_n - torch.lgamma(counts + 1) - torch.lgamma(n - counts + 1) + counts * log_p + (n - counts) * log_q
    return min(1.0, float(torch.logsumexp(log_mass, dim=0).exp()))


def binomial_p_value(num_losses: int, n: int, level: float) -> float:
    """Exact p-value of "risk > ``level``" for a 0/1 loss with ``num_losses`` ones in ``n`` rows:
    ``P(Binomial(n, level) <= num_losses)``.

    Example:
        >>> round(binomial_p_value(0, 300, 0.01), 4)  # no loss in 300 rows: (1 - 0.01) ** 300
        0.049
    """
    return binomial_cdf(num_losses, n, level)


def _kl_bernoulli(a: float, b: float) -> float:
    """``h1(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b))``, with ``0 log 0 = 0``."""
    value = 0.0
    if a > 0.0:
        value += a * math.log(a / b) if b > 0.0 else math.inf
    if a < 1.0:
        value += (1.0 - a) * math.log((1.0 - a) / (1.0 - b)) if b < 1.0 else math.inf
    return value


def hoeffding_bentkus_p_value(mean_loss: float, n: int, level: float) -> float:
    """Hoeffding-Bentkus p-value of "risk > ``level``" for ``n`` losses in ``[0, 1]`` with mean
    ``mean_loss`` (Bates et al. 2021, Proposition 3).

    Example:
        >>> hoeffding_bentkus_p_value(0.5, 100, 0.4)  # the mean is above the level: no evidence
        1.0
    """
    if not 0.0 <= mean_loss <= 1.0:
        raise ValueError(f"the Hoeffding-Bentkus p-value needs a mean loss in [0, 1], got {mean_loss}.")
    hoeffding = math.exp(-n * _kl_bernoulli(min(mean_loss, level), level))
    # A mean of k/n computed in floating point may sit a hair above k/n: round before the ceiling.
    bentkus = math.e * binomial_cdf(math.ceil(round(n * mean_loss, 9)), n, level)
    return min(1.0, hoeffding, bentkus)


def upper_confidence_bound(mean_loss: float, n: int, delta: float, method: str = "binomial") -> float:
    """The ``(1 - delta)`` upper confidence bound of the risk: the smallest level whose p-value
    (``method``: ``"binomial"`` or ``"hoeffding_bentkus"``) is at most ``delta``.

    Both p-values fall as the level rises, so the bound is found by bisection (to ``1e-10``).

    Example:
        >>> round(upper_confidence_bound(0.0, 300, 0.05), 5)  # 1 - 0.05 ** (1 / 300)
        0.00994
    """
    def p_value(level: float) -> float:
        if method == "binomial":
            return binomial_p_value(round(mean_loss * n), n, level)
        if method == "hoeffding_bentkus":
            return hoeffding_bentkus_p_value(mean_loss, n, level)
        raise ValueError(f"method must be 'binomial' or 'hoeffding_bentkus', got {method!r}.")

    low, high = mean_loss, 1.0  # p(high) <= delta, p(low) > delta unless the bound is the mean itself
    if p_value(high) > delta:
        return 1.0
    while high - low > 1e-10:
        middle = (low + high) / 2
        if p_value(middle) <= delta:
            high = middle
        else:
            low = middle
    return high
