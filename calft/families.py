"""The 30 distribution families of docs/method.md, section 'Families and grids': parameters, validation, scipy mapping, grids.

A prompt names a family by its display name and lists its parameters in a fixed order
(`Family.param_names`). `Family.frozen(params)` maps those prompt parameters to a frozen
scipy distribution, the single source of truth for the target (support, cdf, pmf, moments):

    uniform(a, b)            -> uniform(loc=a, scale=b-a)
    triangular(a, c, b)      -> triang(c=(c-a)/(b-a), loc=a, scale=b-a)
    truncnorm(mu, sigma, lo, up) -> truncnorm((lo-mu)/sigma, (up-mu)/sigma, loc=mu, scale=sigma)
    inverse_gaussian(mu, lambda) -> invgauss(mu/lambda, scale=lambda)   (mean mu, shape lambda)
    ...                                                                  (see `FAMILIES` below)

Counts (n, r, M, K, N) must be whole numbers (25 and 25.0 are fine, 2.5 is a `ValueError`) and
become Python ints in `Family.validate`; everything else becomes a Python float. The hypergeometric
population M is capped at 10^7 (scipy's pmf costs O(M)). Invalid input raises `ValueError` naming the family, the parameter and the valid
range (docs/method.md, section 'Families and grids').

The parameter grids of the splits live in calft.splits.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
from scipy import stats

INF = math.inf


# ----------------------------------------------------------------------------------------------
# parameters and families


@dataclass(frozen=True)
class Param:
    """One prompt parameter: its valid interval and whether it is a count (rounded to int)."""

    name: str
    low: float = -INF
    high: float = INF
    low_closed: bool = False  # True: low itself is allowed
    high_closed: bool = False
    integer: bool = False

    def describe(self) -> str:
        """Valid range as text, e.g. '(0, inf)', '[0, 1]', 'integer >= 1', 'any finite real'."""
        if self.integer:
            low = self.low if self.low_closed else self.low + 1
            return f"integer >= {int(low)}" if self.high == INF else f"integer in [{int(low)}, {int(self.high)}]"
        if self.low == -INF and self.high == INF:
            return "any finite real"
        left = "[" if self.low_closed else "("
        right = "]" if self.high_closed else ")"
        return f"{left}{_fmt(self.low)}, {_fmt(self.high)}{right}"

    def contains(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below


def _fmt(x: float) -> str:
    if x in (INF, -INF):
        return "inf" if x > 0 else "-inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _real(name: str) -> Param:
    return Param(name)


def _pos(name: str) -> Param:
    return Param(name, low=0.0)


def _prob(name: str, *, zero: bool = True) -> Param:
    return Param(name, low=0.0, high=1.0, low_closed=zero, high_closed=True)


def _count(name: str, low: int, high: float = INF) -> Param:
    return Param(name, low=float(low), high=high, low_closed=True, high_closed=True, integer=True)


# scipy's hypergeometric pmf (Boost) costs O(M) per value: 1001 values take 0.08 s at M = 1e7,
# 9 s at M = 1e9 and never finished at M = 1e12. Populations up to 1e7 keep a support < 0.1 s.
_HYPERGEOM_MAX_M = 10**7


@dataclass(frozen=True)
class Family:
    """A distribution family: identity (id, display, tier), prompt parameters and scipy mapping.

    `param_names` is the order in which the prompt lists the parameters (e.g. ("a", "c", "b")
    for triangular). `validate` returns the normalized parameters in that order.
    """

    id: str
    display: str
    tier: str  # "I", "II" or "III" (difficulty tiers of the paper)
    param_names: tuple[str, ...]
    integer_only: bool
    held_out: bool
    params: tuple[Param, ...] = field(repr=False, compare=False)
    scipy: Callable[..., tuple] = field(repr=False, compare=False)  # params -> (dist, args, kwds)
    # cross-parameter constraints: (params dict) -> error text or None
    check: Callable[[dict], str | None] | None = field(default=None, repr=False, compare=False)

    def validate(self, params: Mapping[str, float]) -> dict[str, float | int]:
        """Check `params` and return them normalized, in prompt order.

        Raises `ValueError` (naming the family, the parameter and its valid range) for missing or
        unexpected keys, non-numeric or non-finite values, values outside the range, and
        violated cross-parameter constraints (b > a, a <= c <= b, lower < upper, K <= M, N <= M).
        """
        if not isinstance(params, Mapping):
            raise ValueError(f"{self.id}: parameters must be a mapping {{name: value}}, got {type(params).__name__}")
        expected = ", ".join(self.param_names)
        for key in params:
            if key not in self.param_names:
                close = difflib.get_close_matches(str(key), self.param_names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{self.id}: unexpected parameter {key!r}{hint}; expected parameters ({expected})")
        out: dict[str, float | int] = {}
        for p in self.params:
            if p.name not in params:
                raise ValueError(f"{self.id}: missing parameter {p.name!r}; expected parameters ({expected})")
            raw = params[p.name]
            if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, numbers.Real):
                raise ValueError(
                    f"{self.id}: parameter {p.name!r} must be a real number ({p.describe()}), got {raw!r}"
                )
            try:
                x = float(raw)
            except OverflowError:  # an int beyond float64, e.g. 10**400
                x = math.inf if raw > 0 else -math.inf
            if not math.isfinite(x):
                raise ValueError(f"{self.id}: parameter {p.name!r} must be finite ({p.describe()}), got {raw!r}")
            if abs(x) > 2.0**53:  # the prompt would print a 300-digit number no support can discretize
                raise ValueError(f"{self.id}: parameter {p.name!r}={raw!r} is beyond 2**53 in magnitude "
                                 f"({p.describe()}): no exact decimal grid holds it")
            if p.integer:
                if not x.is_integer():  # 2.5 trials is a typo, not a count to round silently
                    raise ValueError(
                        f"{self.id}: parameter {p.name!r} is a count and must be a whole number "
                        f"({p.describe()}), got {raw!r}"
                    )
                x = int(x)
            if not p.contains(x):
                raise ValueError(f"{self.id}: parameter {p.name!r}={raw!r} is outside its valid range {p.describe()}")
            out[p.name] = int(x) if p.integer else x
        if self.check is not None:
            problem = self.check(out)
            if problem:
                raise ValueError(f"{self.id}: {problem}")
        return out

    def frozen(self, params: Mapping[str, float]):
        """The scipy frozen distribution for these (validated) prompt parameters."""
        dist, args, kwds = self.scipy(**self.validate(params))
        return dist(*args, **kwds)

    def light_frozen(self, params: Mapping[str, float]) -> "LightFrozen":
        """Like `frozen`, ~0.5 ms cheaper: what `calft.support` uses for thousands of prompts."""
        return LightFrozen(*self.scipy(**self.validate(params)))

    def support_bounds(self, params: Mapping[str, float]) -> tuple[float, float]:
        """(lo, hi) of the support as floats; -inf/inf where unbounded (geometric: (1, inf))."""
        lo, hi = self.frozen(params).support()
        return float(lo), float(hi)

    def moments(self, params: Mapping[str, float]) -> tuple[float, float]:
        """True (mean, variance) from scipy; inf or nan where the moment does not exist (Cauchy)."""
        mean, var = self.frozen(params).stats(moments="mv")
        return float(mean), float(var)


class LightFrozen:
    """Frozen-distribution stand-in: `method(x)` -> `dist.method(x, *args, **kwds)`.

    scipy's `rv_frozen` forwards its calls exactly this way, so the numbers are identical; but
    its constructor re-instantiates the distribution class and re-renders its docstring (~0.5 ms,
    a third of building a support). Only the methods the discretizer needs are here.
    """

    __slots__ = ("dist", "args", "kwds")

    def __init__(self, dist, args: tuple, kwds: dict):
        self.dist, self.args, self.kwds = dist, args, kwds

    def cdf(self, x):
        return self.dist.cdf(x, *self.args, **self.kwds)

    def sf(self, x):
        return self.dist.sf(x, *self.args, **self.kwds)

    def ppf(self, q):
        return self.dist.ppf(q, *self.args, **self.kwds)

    def pmf(self, k):
        return self.dist.pmf(k, *self.args, **self.kwds)

    def logpmf(self, k):
        return self.dist.logpmf(k, *self.args, **self.kwds)

    def pdf(self, x):
        return self.dist.pdf(x, *self.args, **self.kwds)

    def support(self):
        return self.dist.support(*self.args, **self.kwds)


class _SkellamGen(type(stats.skellam)):
    """scipy's Skellam with its ppf found on the cdf: the smallest integer k with cdf(k) >= q.

    scipy's generic discrete ppf (1.17) raises "updating stopped, endless loop" for some
    quantiles, e.g. Skellam(2.562, 7.249) at q = 0.1, a test_within_range prompt. Here the cdf is
    evaluated once on an integer window around the mean (widened until it brackets every q) and
    searched, per distinct (mu1, mu2)."""

    def _ppf(self, q, mu1, mu2):
        q, mu1, mu2 = np.broadcast_arrays(np.asarray(q, dtype=np.float64), mu1, mu2)
        out = np.empty(q.shape)
        for m1, m2 in {(float(a), float(b)) for a, b in zip(mu1.ravel(), mu2.ravel())}:
            at = (mu1 == m1) & (mu2 == m2)
            lo, hi = math.floor(m1 - m2 - 10 * math.sqrt(m1 + m2)), math.ceil(m1 - m2 + 10 * math.sqrt(m1 + m2))
            ks = np.arange(lo, hi + 1)
            cdf = self._cdf(ks, m1, m2)
            while cdf[0] >= q[at].min() or cdf[-1] < q[at].max():  # widen until the window brackets q
                lo, hi = lo - (hi - lo), hi + (hi - lo)
                ks = np.arange(lo, hi + 1)
                cdf = self._cdf(ks, m1, m2)
            out[at] = ks[np.searchsorted(cdf, q[at], side="left")]
        return out


_skellam = _SkellamGen(a=-np.inf, name="skellam", longname="A Skellam")


def _call(dist, *args, **kwds) -> tuple:
    """Record a scipy distribution call (dist, args, kwds) without freezing it."""
    return dist, args, kwds


def _ordered(name_a: str, name_b: str) -> Callable[[dict], str | None]:
    def check(p: dict) -> str | None:
        if not p[name_b] > p[name_a]:
            return (
                f"parameter {name_b!r} must be > {name_a!r} (got {name_a}={p[name_a]}, {name_b}={p[name_b]}); "
                f"valid range: {name_b} in ({p[name_a]}, inf)"
            )
        return None

    return check


def _check_triangular(p: dict) -> str | None:
    problem = _ordered("a", "b")(p)
    if problem:
        return problem
    if not p["a"] <= p["c"] <= p["b"]:
        return f"parameter 'c' (the mode) must lie in [a, b] = [{p['a']}, {p['b']}], got c={p['c']}"
    return None


def _check_hypergeometric(p: dict) -> str | None:
    for name in ("K", "N"):
        if p[name] > p["M"]:
            return f"parameter {name!r}={p[name]} must be <= M={p['M']}; valid range: integer in [0, {p['M']}]"
    return None


# docs/method.md, section 'Families and grids' table, in the family table's order. (id, display, tier, params, integer, held_out, scipy, check)
_TABLE = [
    ("uniform", "Uniform", "I", (_real("a"), _real("b")), False, False,
     lambda a, b: _call(stats.uniform, loc=a, scale=b - a), _ordered("a", "b")),
    ("gaussian", "Gaussian", "I", (_real("mu"), _pos("sigma")), False, False,
     lambda mu, sigma: _call(stats.norm, mu, sigma), None),
    ("bernoulli", "Bernoulli", "I", (_prob("p"),), True, True,
     lambda p: _call(stats.bernoulli, p), None),
    ("beta", "Beta", "II", (_pos("alpha"), _pos("beta")), False, False,
     lambda alpha, beta: _call(stats.beta, alpha, beta), None),
    ("binomial", "Binomial", "II", (_count("n", 0), _prob("p")), True, False,
     lambda n, p: _call(stats.binom, n, p), None),
    ("poisson", "Poisson", "II", (_pos("lambda"),), True, True,
     lambda **k: _call(stats.poisson, k["lambda"]), None),
    ("exponential", "Exponential", "II", (_pos("lambda"),), False, False,
     lambda **k: _call(stats.expon, scale=1.0 / k["lambda"]), None),
    ("geometric", "Geometric", "II", (_prob("p", zero=False),), True, False,
     lambda p: _call(stats.geom, p), None),
    ("negative_binomial", "Negative Binomial", "II", (_count("r", 1), _prob("p", zero=False)), True, False,
     lambda r, p: _call(stats.nbinom, r, p), None),
    ("lognormal", "LogNormal", "II", (_real("mu"), _pos("sigma")), False, False,
     lambda mu, sigma: _call(stats.lognorm, s=sigma, scale=math.exp(mu)), None),
    ("triangular", "Triangular", "II", (_real("a"), _real("c"), _real("b")), False, False,
     lambda a, c, b: _call(stats.triang, c=(c - a) / (b - a), loc=a, scale=b - a), _check_triangular),
    ("rayleigh", "Rayleigh", "II", (_pos("sigma"),), False, False,
     lambda sigma: _call(stats.rayleigh, scale=sigma), None),
    ("maxwell", "Maxwell", "II", (_pos("scale"),), False, True,
     lambda scale: _call(stats.maxwell, scale=scale), None),
    ("truncnorm", "TruncNorm", "II", (_real("mu"), _pos("sigma"), _real("lower"), _real("upper")), False, True,
     lambda mu, sigma, lower, upper: _call(stats.truncnorm, (lower - mu) / sigma, (upper - mu) / sigma, loc=mu, scale=sigma),
     _ordered("lower", "upper")),
    ("cauchy", "Cauchy", "III", (_real("x0"), _pos("gamma")), False, False,
     lambda x0, gamma: _call(stats.cauchy, x0, gamma), None),
    ("student_t", "Student's t", "III", (_pos("nu"),), False, False,
     lambda nu: _call(stats.t, nu), None),
    ("chi_square", "Chi-Square", "III", (_pos("nu"),), False, False,
     lambda nu: _call(stats.chi2, nu), None),
    ("f_distribution", "F-Distribution", "III", (_pos("d1"), _pos("d2")), False, False,
     lambda d1, d2: _call(stats.f, d1, d2), None),
    ("gamma", "Gamma", "III", (_pos("alpha"), _pos("beta")), False, False,
     lambda alpha, beta: _call(stats.gamma, alpha, scale=beta), None),
    ("weibull", "Weibull", "III", (_pos("k"), _pos("lambda")), False, True,
     lambda **k: _call(stats.weibull_min, k["k"], scale=k["lambda"]), None),
    ("laplace", "Laplace", "III", (_real("mu"), _pos("b")), False, False,
     lambda mu, b: _call(stats.laplace, mu, b), None),
    ("logistic", "Logistic", "III", (_real("mu"), _pos("s")), False, False,
     lambda mu, s: _call(stats.logistic, mu, s), None),
    ("pareto", "Pareto", "III", (_pos("alpha"), _pos("xm")), False, False,
     lambda alpha, xm: _call(stats.pareto, alpha, scale=xm), None),
    ("hypergeometric", "Hypergeometric", "III", (_count("M", 1, _HYPERGEOM_MAX_M), _count("K", 0), _count("N", 0)), True, False,
     lambda M, K, N: _call(stats.hypergeom, M, K, N), _check_hypergeometric),
    ("gumbel", "Gumbel", "III", (_real("mu"), _pos("beta")), False, False,
     lambda mu, beta: _call(stats.gumbel_r, mu, beta), None),
    ("skellam", "Skellam", "III", (_pos("mu1"), _pos("mu2")), True, False,
     lambda mu1, mu2: _call(_skellam, mu1, mu2), None),
    ("beta_binomial", "Beta-Binomial", "III", (_count("n", 0), _pos("alpha"), _pos("beta")), True, False,
     lambda n, alpha, beta: _call(stats.betabinom, n, alpha, beta), None),
    ("lomax", "Lomax", "III", (_pos("alpha"), _pos("lambda")), False, False,
     lambda **k: _call(stats.lomax, k["alpha"], scale=k["lambda"]), None),
    ("inverse_gaussian", "Inverse Gaussian", "III", (_pos("mu"), _pos("lambda")), False, False,
     lambda **k: _call(stats.invgauss, k["mu"] / k["lambda"], scale=k["lambda"]), None),
    ("chi", "Chi", "III", (_pos("df"),), False, True,
     lambda df: _call(stats.chi, df), None),
]

FAMILIES: dict[str, Family] = {
    fid: Family(fid, display, tier, tuple(p.name for p in params), integer, held_out, params, scipy, check)
    for fid, display, tier, params, integer, held_out, scipy, check in _TABLE
}
TRAIN_FAMILY_IDS: tuple[str, ...] = tuple(f.id for f in FAMILIES.values() if not f.held_out)
HELD_OUT_FAMILY_IDS: tuple[str, ...] = tuple(f.id for f in FAMILIES.values() if f.held_out)


def get_family(family_id: str) -> Family:
    """The `Family` for an id; `ValueError` with the closest known id on a typo."""
    if isinstance(family_id, Family):
        return family_id
    if isinstance(family_id, str) and family_id in FAMILIES:
        return FAMILIES[family_id]
    close = difflib.get_close_matches(str(family_id).lower(), list(FAMILIES), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown distribution family {family_id!r}{hint} (known: {', '.join(FAMILIES)})")
