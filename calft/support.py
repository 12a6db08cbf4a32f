"""Discretized target distributions over canonical answer strings (docs/method.md, section 'Supports').

Integer families (values lo..hi, probability = pmf):
    lo = support_min            if finite else floor(ppf(q_low))
    hi = support_max            if finite else ceil(ppf(q_high))
    If hi - lo + 1 > max_bins, keep the window of max_bins values centred on the mode (shifted to
    stay inside [lo, hi]). The mode is found by ternary search on the pmf inside the quantile band
    [floor(ppf(q_low)), ceil(ppf(q_high))]: scipy's logpmf (lgamma differences) loses whole units
    at counts near 1e15, which put the window of binomial(n=1e15, p=.3) a full sd below its mode.
    Values beyond 2^53 (not exact in float64; binomial n=1e18, geometric p=1e-300) are refused.
    Mass outside the kept window goes to its edge values, on BOTH sides:
        p(w_lo) += P(X < w_lo),  p(w_hi) += P(X > w_hi)        (a fix over the paper's artifact: Skellam's lower tail)

Continuous families (d = num_decimals, h = 10^-d):
    lower = ppf(q_low), upper = ppf(q_high), clipped to the support.
    centers c_j = k_j h for the integers k in [ceil(lower / h), floor(upper / h)], both divisions
    in float64 with h = 10.0**-d: the artifact's rule, kept so that the paper recipes reproduce
    the paper's targets exactly. Rule for a grid point on a quantile: it is kept exactly when the
    float quotient x / h rounds onto (or inside) it. Where this differs from an exact decimal
    comparison (k h as a decimal against lower/upper as the binary floats they are): uniform and
    triangular quantiles such as 3.5 + 0.001 * 7 = 3.507 are exact decimals whose float lies one
    ulp outside; x / h then rounds to the integer and the artifact keeps the center one ulp
    outside [lower, upper] (its bin simply has a tiny width), where exact comparison would drop
    it. Measured over every continuous prompt of the five splits (2239): 45 prompts differ at 2
    decimals, 121 at 3, 95 at 5, 0 at 1; always the first or last center, which then shifts
    every subsampled index. Ties the other way also agree: triangular(a=-2, c=-1.6, b=2) has
    ppf(.999) = 1.88 analytically, the float is 1.8799999999999999, 1.8799999999999999 / 0.01 =
    187.99999999999997, so the grid ends at '1.87' (calft's earlier float test k/100 <= upper kept
    '1.88').
    When there are n > max_bins centers keep k_lo + idx_i with idx = np.linspace(0, n-1, max_bins,
    dtype=int), the artifact's rule: idx_i = trunc(fl(i * fl((n-1)/(max_bins-1)))), which is
    floor(i (n-1)/(max_bins-1)) except where float rounding lands just below an exact integer
    (n = 1016: i = 200 gives 202, not 203); we reproduce the artifact, float rounding included.
    (max_bins = 1, not a paper setting, keeps the multiple nearest the median, not index 0.)
    The centers come from the index formula in O(max_bins) time and memory (fix over the artifact, docs/method.md: the
    artifact materialized all n centers, ~1 GB for one Cauchy prompt at 5 decimals).
    edges e = [lower, (c_0+c_1)/2, ..., (c_{m-2}+c_{m-1})/2, upper],  p_j = F(e_{j+1}) - F(e_j).
    Bins below the median use cdf differences, bins above it sf differences (no cancellation
    near 1). With tail_policy="clip_to_edge_bin": p_0 += F(lower), p_{m-1} += S(upper);
    with "renormalize" the outside mass is dropped.
    If no multiple of h lies in [lower, upper] (e.g. Beta at 0 decimals), the support is the
    single multiple nearest the median, with probability 1.

Strings: integers as str(k); continuous centers as f"{k / 10^d:.{d}f}", which is exact for
|k| < 2^52 (checked), so distinct k give distinct strings and zero prints as "0.00", never
"-0.00" (the artifact's float centers could print both, hence the method's "merge equal adjacent
strings"; with exact strings there is nothing to merge). Exact-zero values are dropped and the
probabilities renormalized, all in float64.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from calft.families import LightFrozen, get_family

TAIL_POLICIES = ("clip_to_edge_bin", "renormalize")
MAX_DECIMALS = 15  # beyond this 10^d * x cannot hold the exact integer k in float64
MAX_BINS = 1 << 24  # support strings per prompt: ~100 bytes each as Python strings, 1.6 GB at this cap


@dataclass
class Support:
    """A discretized target: canonical strings `values` with float64 `probs` (sum to 1).

    num_decimals: the decimals the strings carry (the requested d for continuous families, 0 for
    integer families). lower/upper: the covered interval ([lower, upper] for continuous
    families, the kept window [w_lo, w_hi] for integer ones). tail_mass: the probability that
    lay outside it (folded into the edge values or dropped, per the tail policy).
    """

    family_id: str
    params: dict
    num_decimals: int
    values: tuple[str, ...]
    probs: np.ndarray
    integer: bool
    lower: float = field(default=math.nan)
    upper: float = field(default=math.nan)
    tail_mass: float = field(default=0.0)

    def __len__(self) -> int:
        return len(self.values)

    def numeric_values(self) -> np.ndarray:
        """The support values as float64."""
        return np.array([float(v) for v in self.values], dtype=np.float64)


def format_centers(ks, num_decimals: int) -> list[str]:
    """Strings of k * 10^-d with d decimals: format_centers([-5, 0, 12], 2) == ['-0.05', '0.00', '0.12'].

    Exact: the float k / 10^d is within 1e-16 |k / 10^d| of the true value, far inside the
    +-0.5 10^-d that would change the printed digits while |k| < 2^52 (checked by the caller).
    k = 0 gives +0.0, so zero never prints as "-0.00". One %-format over the whole batch is ~3x
    faster than a per-value loop (1001 strings: ~0.3 ms).
    """
    ks = np.asarray(ks, dtype=np.int64)
    if len(ks) == 0:
        return []
    if num_decimals == 0:
        return [str(k) for k in ks.tolist()]
    centers = (ks / 10.0**num_decimals).tolist()
    return ((f"%.{num_decimals}f\n" * len(centers)) % tuple(centers))[:-1].split("\n")


def _check_settings(num_decimals, max_bins, quantile_low, quantile_high, tail_policy) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if not is_int(num_decimals) or not 0 <= num_decimals <= MAX_DECIMALS:
        raise ValueError(f"num_decimals must be an integer in [0, {MAX_DECIMALS}], got {num_decimals!r}")
    if not is_int(max_bins) or max_bins < 1:
        raise ValueError(f"max_bins must be an integer >= 1, got {max_bins!r}")
    if max_bins > MAX_BINS:
        raise ValueError(f"max_bins={max_bins} is too many: a support of that many strings needs about "
                         f"{max_bins * 100 / 2**30:.0f} GB of memory; at most {MAX_BINS:,}")
    for name, q in (("quantile_low", quantile_low), ("quantile_high", quantile_high)):
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 < float(q) < 1.0:
            raise ValueError(f"{name} must be a number in (0, 1), got {q!r}")
    if not quantile_low < quantile_high:
        raise ValueError(f"need quantile_low < quantile_high, got {quantile_low!r} >= {quantile_high!r}")
    if tail_policy not in TAIL_POLICIES:
        raise ValueError(f"unknown tail_policy {tail_policy!r}; known: {', '.join(TAIL_POLICIES)}")


def build_support(
    family_id: str,
    params,
    *,
    num_decimals: int = 2,
    max_bins: int = 1001,
    quantile_low: float = 0.001,
    quantile_high: float = 0.999,
    tail_policy: str = "clip_to_edge_bin",
) -> Support:
    """The discretized target of one prompt (module docstring has the formulas)."""
    _check_settings(num_decimals, max_bins, quantile_low, quantile_high, tail_policy)
    family = get_family(family_id)
    clean = family.validate(params)
    dist = LightFrozen(*family.scipy(**clean))  # params validated just above
    if family.integer_only:
        ks, mass, lower, upper, tails = _integer_bins(dist, int(max_bins), quantile_low, quantile_high)
        values = format_centers(ks, 0)
        decimals = 0
    else:
        ks, mass, lower, upper, tails = _continuous_bins(
            family.id, dist, int(num_decimals), int(max_bins), quantile_low, quantile_high
        )
        values = format_centers(ks, int(num_decimals))
        decimals = int(num_decimals)
    if tail_policy == "clip_to_edge_bin":
        mass[0] += tails[0]
        mass[-1] += tails[1]
    values, probs = _drop_zeros_and_normalize(family.id, clean, values, mass)
    return Support(family.id, clean, decimals, values, probs, family.integer_only, lower, upper, float(sum(tails)))


def _integer_bins(dist, max_bins: int, q_low: float, q_high: float):
    """(ks, pmf(ks), w_lo, w_hi, (P(X < w_lo), P(X > w_hi))) for an integer distribution."""
    s_lo, s_hi = (float(x) for x in dist.support())
    lo = math.floor(s_lo) if math.isfinite(s_lo) else None
    hi = math.ceil(s_hi) if math.isfinite(s_hi) else None
    _check_exact_integers(dist, [x for x in (s_lo, s_hi) if math.isfinite(x)] or [0.0])  # before ppf:
    # Boost's binomial quantile at n = 1e18 does not return
    q = None
    if lo is None or hi is None or hi - lo + 1 > max_bins:
        q = np.asarray(dist.ppf([q_low, q_high]), dtype=np.float64)
        if not np.all(np.isfinite(q)):
            raise ValueError(f"{dist.dist.name}: ppf gave non-finite quantiles {q}; cannot bound the support")
        _check_exact_integers(dist, q)
        lo = math.floor(q[0]) if lo is None else lo
        hi = math.ceil(q[1]) if hi is None else hi
    hi = max(hi, lo)
    w_lo, w_hi = lo, hi
    if hi - lo + 1 > max_bins:  # central window around the mode (fix over the artifact, docs/method.md)
        band_lo = min(max(math.floor(q[0]), lo), hi)
        band_hi = max(min(math.ceil(q[1]), hi), band_lo)
        mode = _integer_mode(dist, band_lo, band_hi)
        w_lo = min(max(mode - (max_bins - 1) // 2, lo), hi - max_bins + 1)
        w_hi = w_lo + max_bins - 1
    ks = np.arange(w_lo, w_hi + 1, dtype=np.int64)
    mass = np.asarray(dist.pmf(ks), dtype=np.float64)
    below = float(dist.cdf(w_lo - 1)) if w_lo > s_lo else 0.0
    above = float(dist.sf(w_hi)) if w_hi < s_hi else 0.0
    return ks, mass, float(w_lo), float(w_hi), (below, above)


def _check_exact_integers(dist, q) -> None:
    """Refuse quantiles beyond 2^53, where float64 (scipy's pmf/cdf input) skips integers."""
    if np.max(np.abs(q)) > 2.0**53:
        raise ValueError(
            f"{dist.dist.name}: the support (or its central 99.8%) reaches {np.max(np.abs(q)):.3g}, "
            "beyond 2**53 = 9.0e15 where float64 cannot represent every integer; "
            "choose parameters whose values stay below 2**53"
        )


def _integer_mode(dist, lo: int, hi: int) -> int:
    """Mode of a unimodal integer distribution on [lo, hi]: ternary search on the pmf, O(log range).

    pmf, not logpmf: scipy's binomial/negative-binomial pmf comes from Boost (accurate at any
    count), while logpmf subtracts lgamma values of ~1e16, so at counts near 1e15 it is noise of
    several units and the search wandered a full standard deviation off the mode. Where both
    probes underflow to 0, logpmf breaks the tie.
    """
    a, b = lo, hi
    while b - a > 2:
        m1, m2 = a + (b - a) // 3, b - (b - a) // 3
        f1, f2 = dist.pmf([m1, m2])
        if f1 == 0.0 and f2 == 0.0:
            f1, f2 = dist.logpmf([m1, m2])
        if f1 < f2:
            a = m1 + 1
        elif f1 > f2:
            b = m2 - 1
        else:  # a plateau: for a unimodal pmf the mode lies between (or on) the two probes
            a, b = m1, m2
    cand = np.arange(a, b + 1)
    return int(cand[int(np.argmax(dist.pmf(cand)))])


def _even_ks(k_lo: int, n: int, m: int) -> np.ndarray:
    """k_lo + np.linspace(0, n-1, m, dtype=int): the artifact's subsampling, float rounding included."""
    return k_lo + np.linspace(0, n - 1, m).astype(np.int64)


def _grid_range(lower: float, upper: float, d: int) -> tuple[int, int]:
    """(k_lo, k_hi) = (ceil(lower / h), floor(upper / h)), h = 10.0**-d in float64 (the artifact's rule)."""
    h = 10.0 ** (-d)
    return math.ceil(lower / h), math.floor(upper / h)


def _continuous_bins(family_id: str, dist, d: int, max_bins: int, q_low: float, q_high: float):
    """(ks, bin masses, lower, upper, (F(lower), S(upper))); centers are ks * 10^-d."""
    q = np.asarray(dist.ppf([q_low, 0.5, q_high]), dtype=np.float64)
    s_lo, s_hi = (float(x) for x in dist.support())
    if not np.all(np.isfinite(q)):
        raise ValueError(f"{family_id}: ppf gave non-finite quantiles {q.tolist()}; cannot discretize")
    lower, median, upper = max(q[0], s_lo), q[1], min(q[2], s_hi)
    scale = 10.0**d
    if max(abs(lower), abs(upper)) * scale >= 2.0**52:
        raise ValueError(
            f"{family_id}: num_decimals={d} is too fine for the range [{lower:g}, {upper:g}] "
            "(the grid index would not fit exactly in float64)"
        )
    k_lo, k_hi = _grid_range(lower, upper, d)  # the artifact's float rule (module docstring)
    n = k_hi - k_lo + 1
    if n <= 0:  # no grid point in [lower, upper]: one value, the multiple nearest the median
        k = int(round(median * scale))
        return [k], np.array([1.0]), float(lower), float(upper), (0.0, 0.0)
    if n <= max_bins:
        ks = np.arange(k_lo, k_hi + 1, dtype=np.int64)
    elif max_bins == 1:
        ks = np.array([min(max(int(round(median * scale)), k_lo), k_hi)], dtype=np.int64)
    else:
        ks = _even_ks(k_lo, n, max_bins)
    centers = ks / scale
    edges = np.concatenate(([lower], (centers[:-1] + centers[1:]) / 2.0, [upper]))
    # cdf differences below the median, sf differences above it: no cancellation near 1
    j = int(np.searchsorted(edges, median, side="right"))  # edges[:j] <= median
    F = np.asarray(dist.cdf(edges[:j]), dtype=np.float64)
    S = np.asarray(dist.sf(edges[j:]), dtype=np.float64)
    mass = np.empty(len(edges) - 1, dtype=np.float64)
    if j >= 2:
        mass[: j - 1] = np.diff(F)
    if len(S) >= 2:
        mass[j:] = -np.diff(S)
    if 0 < j < len(edges):
        mass[j - 1] = 1.0 - F[-1] - S[0]
    np.maximum(mass, 0.0, out=mass)
    tail_low = float(F[0]) if j > 0 else 1.0 - float(S[0])
    tail_high = float(S[-1]) if j < len(edges) else 1.0 - float(F[-1])
    return ks, mass, float(lower), float(upper), (tail_low, tail_high)


def _drop_zeros_and_normalize(family_id: str, params: dict, values: list[str], mass: np.ndarray):
    """Drop exact-zero values and renormalize (float64).

    docs/method.md merges equal adjacent strings; none exist here: the grid indices k are strictly
    increasing and `format_centers` is exact, so distinct k give distinct strings (the
    artifact's float formatting could print "-0.00" and "0.00" for neighbours).
    """
    keep = mass > 0
    total = float(mass[keep].sum())
    if not keep.any() or not math.isfinite(total):
        raise ValueError(f"{family_id}{params}: the discretized support has no positive mass")
    if not keep.all():
        values = [v for v, k in zip(values, keep.tolist()) if k]
        mass = mass[keep]
    return tuple(values), mass / total
