"""Prompt splits (docs/method.md, section 'Families and grids'): which (family, parameters) pairs each split holds.

    train               24 training families, cartesian grid, evenly subsampled to 121 per family
                        (triangular: 125, its whole 5x5x5 grid, as in the artifact's config): 1988
    test_unseen_params  same families, disjoint parameter ranges, at most 36 per family
    test_within_range   same families, unseen parameters inside the training ranges (midpoints
                        between consecutive training grid values), at most 36 per family
    test_selected       one headline row per training family (24)
    test_ood_family     the 6 held-out families on their ood grids
    ood_selected        3 headline rows per held-out family (18)

Even subsampling keeps the grid points at indices np.linspace(0, n-1, max_specs, dtype=int) of the
cartesian order (first axis slowest), the artifact's rule (truncation, float rounding included), so
the first and last grid points always stay. With the paper's caps no training or test grid is
larger than its cap, so nothing is dropped by default; the rule matters for a smaller `max_specs`.
Everything is deterministic: no random numbers are involved.

The parameter grids (`GRIDS`) are, written in each family's *grid*
parameterization; `grid_point_to_params` maps a grid point to prompt parameters:
uniform (a, width) -> b = a + width; triangular (a, width, mode_fraction) -> c = a + width * mf,
b = a + width; hypergeometric (M, N, success_fraction) -> K = round(M * sf), N = min(N, M).
Python's `round` (half to even) is used for K, as the artifact did. Every grid value is snapped
to the 4 significant digits the prompt prints (`snap_number`), so the prompt text describes the
target distribution exactly (parsing the printed numbers gives back the parameters).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from calft.families import FAMILIES, get_family

# ------------------------------------------------------------------------------------------------
# parameter grids (docs/method.md, section 'Families and grids')

def snap_number(x: float) -> float | int:
    """Snap a grid value to the 4 significant digits the prompt prints (ints stay ints)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return int(x)
    y = float(f"{float(x):.4g}")
    return 0.0 if y == 0 else y


def lin(a: float, b: float, k: int) -> tuple[float, ...]:
    """`lin[a,b]xk`: k linearly spaced points from a to b (inclusive), snapped."""
    return tuple(snap_number(v) for v in np.linspace(a, b, k))


def log(a: float, b: float, k: int) -> tuple[float, ...]:
    """`log[a,b]xk`: k geometrically spaced points from a to b (inclusive), snapped."""
    return tuple(snap_number(v) for v in np.geomspace(a, b, k))


@dataclass(frozen=True)
class Grid:
    """Points in a family's grid parameterization: a cartesian product of `axes`, or `rows`."""

    names: tuple[str, ...]
    axes: tuple[tuple, ...] | None = None
    rows: tuple[tuple, ...] | None = None

    def points(self) -> list[dict[str, float]]:
        """All grid points as dicts, cartesian order (first axis slowest) or row order."""
        rows = itertools.product(*self.axes) if self.axes is not None else self.rows
        return [dict(zip(self.names, row)) for row in rows]

    def __len__(self) -> int:
        return math.prod(len(a) for a in self.axes) if self.axes is not None else len(self.rows)


def _axes(names: str, *axes) -> Grid:
    return Grid(tuple(names.split()), axes=tuple(tuple(a) for a in axes))


def _rows(names: str, *rows) -> Grid:
    names_t = tuple(names.split())
    return Grid(names_t, rows=tuple(r if isinstance(r, tuple) else (r,) for r in rows))


_BINOM_P = (0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8)
_LOC_SCALE_TRAIN = (lin(-2, 2, 11), log(0.5, 2, 11))
_LOC_SCALE_TEST = (lin(2.5, 4, 6), log(2.25, 3.5, 6))

# family -> {split: Grid}; grid parameterization names (uniform: a width; triangular: a width
# mode_fraction; hypergeometric: M N success_fraction), everything else = prompt names.
_GRIDS: dict[str, dict[str, Grid]] = {
    "uniform": dict(train=_axes("a width", lin(-5, 2, 11), lin(1, 5, 11)),
                    test_unseen_params=_axes("a width", lin(2.5, 4.5, 6), lin(5.5, 8, 6)),
                    selected=_rows("a width", (3.5, 7))),
    "gaussian": dict(train=_axes("mu sigma", lin(-2, 2, 11), log(0.5, 2, 11)),
                     test_unseen_params=_axes("mu sigma", lin(2.5, 4, 6), log(2.25, 3.5, 6)),
                     selected=_rows("mu sigma", (3.5, 3))),
    "beta": dict(train=_axes("alpha beta", log(0.5, 5, 11), log(0.5, 5, 11)),
                 test_unseen_params=_axes("alpha beta", log(5.5, 8, 6), log(5.5, 8, 6)),
                 selected=_rows("alpha beta", (7, 7))),
    "binomial": dict(train=_axes("n p", (5, 10, 15, 20), _BINOM_P),
                     test_unseen_params=_axes("n p", (25, 30), (0.25, 0.4, 0.5, 0.6, 0.75)),
                     selected=_rows("n p", (25, 0.5))),
    "exponential": dict(train=_axes("lambda", log(0.5, 5, 25)),
                        test_unseen_params=_axes("lambda", log(5.5, 8, 12)),
                        selected=_rows("lambda", 7)),
    "geometric": dict(train=_axes("p", (0.2, 0.225, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.65, 0.7, 0.75, 0.775, 0.8)),
                      test_unseen_params=_axes("p", (0.05, 0.075, 0.1, 0.125, 0.15, 0.85, 0.875, 0.9, 0.925, 0.95)),
                      selected=_rows("p", 0.125)),
    "negative_binomial": dict(train=_axes("r p", (3, 5, 8, 12), _BINOM_P),
                              test_unseen_params=_axes("r p", (15, 20), (0.1, 0.15, 0.2, 0.8, 0.85, 0.9)),
                              selected=_rows("r p", (15, 0.15))),
    "lognormal": dict(train=_axes("mu sigma", lin(-1, 1.5, 11), log(0.25, 1.25, 11)),
                      test_unseen_params=_axes("mu sigma", lin(1.75, 3, 6), log(1.5, 2.25, 6)),
                      selected=_rows("mu sigma", (2.5, 2))),
    "triangular": dict(train=_axes("a width mode_fraction", lin(-3, 1, 5), lin(1, 5, 5), (0.1, 0.3, 0.5, 0.7, 0.9)),
                       test_unseen_params=_axes("a width mode_fraction", lin(1.5, 3.5, 3), lin(5.5, 8, 3),
                                                (0.1, 0.5, 0.9)),
                       selected=_rows("a width mode_fraction", (2.5, 7, 0.5))),
    "rayleigh": dict(train=_axes("sigma", log(0.5, 2, 25)),
                     test_unseen_params=_axes("sigma", log(2.25, 3.5, 12)),
                     selected=_rows("sigma", 3)),
    "cauchy": dict(train=_axes("x0 gamma", *_LOC_SCALE_TRAIN),
                   test_unseen_params=_axes("x0 gamma", *_LOC_SCALE_TEST),
                   selected=_rows("x0 gamma", (3.5, 3))),
    "student_t": dict(train=_axes("nu", (2.5, 2.75, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9, 10)),
                      test_unseen_params=_axes("nu", (10.5, 12, 14, 16, 18, 20)),
                      selected=_rows("nu", 16)),
    "chi_square": dict(train=_axes("nu", (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20)),
                       test_unseen_params=_axes("nu", (21, 24, 28, 32, 36, 40)),
                       selected=_rows("nu", 32)),
    "f_distribution": dict(train=_axes("d1 d2", (3, 5, 7, 10), (5, 10, 15, 20)),
                           test_unseen_params=_axes("d1 d2", (12, 15), (24, 30)),
                           selected=_rows("d1 d2", (12, 24))),
    "gamma": dict(train=_axes("alpha beta", log(1, 5, 11), log(1, 5, 11)),
                  test_unseen_params=_axes("alpha beta", log(5.5, 8, 6), log(5.5, 8, 6)),
                  selected=_rows("alpha beta", (7, 7))),
    "laplace": dict(train=_axes("mu b", *_LOC_SCALE_TRAIN),
                    test_unseen_params=_axes("mu b", *_LOC_SCALE_TEST),
                    selected=_rows("mu b", (3.5, 3))),
    "logistic": dict(train=_axes("mu s", *_LOC_SCALE_TRAIN),
                     test_unseen_params=_axes("mu s", *_LOC_SCALE_TEST),
                     selected=_rows("mu s", (3.5, 3))),
    "pareto": dict(train=_axes("alpha xm", (2, 2.25, 2.5, 2.75, 3, 3.5, 4, 4.5, 5), log(0.5, 2, 11)),
                   test_unseen_params=_axes("alpha xm", (5.5, 6, 6.5, 7, 8), log(2.5, 4, 6)),
                   selected=_rows("alpha xm", (6.5, 3.5))),
    "hypergeometric": dict(train=_axes("M N success_fraction", (30, 50, 80), (5, 10, 15), (0.2, 0.35, 0.5, 0.65, 0.8)),
                           test_unseen_params=_axes("M N success_fraction", (100, 120), (20, 25), (0.2, 0.5, 0.8)),
                           selected=_rows("M N success_fraction", (100, 20, 0.5))),
    "gumbel": dict(train=_axes("mu beta", *_LOC_SCALE_TRAIN),
                   test_unseen_params=_axes("mu beta", *_LOC_SCALE_TEST),
                   selected=_rows("mu beta", (3.5, 3))),
    "skellam": dict(train=_axes("mu1 mu2", log(1, 8, 11), log(1, 8, 11)),
                    test_unseen_params=_axes("mu1 mu2", log(8.5, 12, 6), log(8.5, 12, 6)),
                    selected=_rows("mu1 mu2", (10.5, 10.5))),
    "beta_binomial": dict(train=_axes("n alpha beta", (10, 20, 30), log(0.5, 5, 5), log(0.5, 5, 5)),
                          test_unseen_params=_axes("n alpha beta", (40, 50), log(5.5, 8, 3), log(5.5, 8, 3)),
                          selected=_rows("n alpha beta", (40, 6.5, 6.5))),
    "lomax": dict(train=_axes("alpha lambda", log(1.5, 4, 11), log(0.5, 3, 11)),
                  test_unseen_params=_axes("alpha lambda", log(4.5, 7, 6), log(3.5, 5, 6)),
                  selected=_rows("alpha lambda", (6, 4.5))),
    "inverse_gaussian": dict(train=_axes("mu lambda", log(0.5, 3, 11), log(0.5, 5, 11)),
                             test_unseen_params=_axes("mu lambda", log(3.5, 6, 6), log(5.5, 8, 6)),
                             selected=_rows("mu lambda", (5, 7))),
    # held-out families: an ood grid and ood_selected rows
    "bernoulli": dict(ood=_axes("p", (0.1, 0.3, 0.5, 0.7, 0.9)), ood_selected=_rows("p", 0.1, 0.5, 0.9)),
    "poisson": dict(ood=_axes("lambda", log(1, 12, 17)), ood_selected=_rows("lambda", 1, 4, 12)),
    "maxwell": dict(ood=_axes("scale", (0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5)), ood_selected=_rows("scale", 0.75, 1.5, 2.5)),
    "truncnorm": dict(ood=_axes("mu sigma lower upper", (0, 1), (1, 1.5), (-2, -1), (1, 2)),
                      ood_selected=_rows("mu sigma lower upper", (0, 1, -1, 1), (0, 1, -2, 2), (1, 1.5, -1, 2))),
    "weibull": dict(ood=_axes("k lambda", log(0.5, 3, 6), log(0.5, 3, 6)),
                    ood_selected=_rows("k lambda", (0.5, 0.5), (1.5, 1.5), (3, 3))),
    "chi": dict(ood=_axes("df", (1.5, 2, 3, 4, 5, 7, 10, 14, 20)), ood_selected=_rows("df", 2, 5, 10)),
}



def _midpoints(values: tuple, integer: bool) -> tuple:
    """Midpoints of consecutive axis values (rounded for counts): inside the axis range, on no
    grid point (when two counts are adjacent integers, their midpoint is skipped)."""
    mids = []
    for lo, hi in zip(values, values[1:]):
        mid = (lo + hi) / 2
        mid = int(round(mid)) if integer else snap_number(mid)
        if mid not in (lo, hi) and mid not in mids:
            mids.append(mid)
    return tuple(mids)


def _within_range_grid(family_id: str, grid: Grid) -> Grid:
    """Unseen parameters inside the training ranges: every axis of the training grid replaced by
    the midpoints of its consecutive values. No point is a training point (every coordinate is
    off-grid) and every point lies inside the training box: interpolation, not extrapolation
    (the paper's test_unseen_params uses disjoint ranges, i.e. extrapolation)."""
    counts = {p.name for p in get_family(family_id).params if p.integer}
    return Grid(grid.names, axes=tuple(_midpoints(axis, name in counts) for name, axis in zip(grid.names, grid.axes)))


# family -> {split grid name: Grid}, plus "within_range" (from the train grid) where there is one
GRIDS: dict[str, dict[str, Grid]] = {
    fid: {**grids, **({"within_range": _within_range_grid(fid, grids["train"])} if "train" in grids else {})}
    for fid, grids in _GRIDS.items()}


def grid_point_to_params(family_id: str, point: Mapping[str, float]) -> dict[str, float | int]:
    """Map a grid point (grid parameterization) to validated prompt parameters, prompt order."""
    family = get_family(family_id)
    p = dict(point)
    if family.id == "uniform":
        p = {"a": p["a"], "b": snap_number(p["a"] + p["width"])}
    elif family.id == "triangular":
        a, width, mf = p["a"], p["width"], p["mode_fraction"]
        p = {"a": a, "c": snap_number(a + width * mf), "b": snap_number(a + width)}
    elif family.id == "hypergeometric":
        M = int(round(p["M"]))
        p = {"M": M, "K": int(round(M * p["success_fraction"])), "N": min(int(round(p["N"])), M)}
    return family.validate(p)


# ------------------------------------------------------------------------------------------------
# splits

SPLITS = ("train", "test_unseen_params", "test_within_range", "test_selected", "test_ood_family",
          "ood_selected")

# split -> (key in GRIDS, default max_specs per family, held-out families?)
# per-family exceptions to the default cap: the artifact's conf/data/calibrate_sft.yaml gives
# triangular max_specs 125 in train (its whole grid), so the train split has 1988 prompts, not 1984
_FAMILY_CAPS = {"train": {"triangular": 125}}
_SPLIT_SOURCES = {
    "train": ("train", 121, False),
    "test_unseen_params": ("test_unseen_params", 36, False),
    "test_within_range": ("within_range", 36, False),
    "test_selected": ("selected", None, False),
    "test_ood_family": ("ood", None, True),
    "ood_selected": ("ood_selected", None, True),
}


@dataclass(frozen=True)
class PromptSpec:
    """One prompt: a family id and its prompt parameters as (name, value) pairs in prompt order."""

    family_id: str
    params: tuple[tuple[str, float | int], ...]

    @classmethod
    def make(cls, family_id: str, params: Mapping[str, float]) -> "PromptSpec":
        """Validate `params` (prompt parameterization) and build the spec."""
        return cls(get_family(family_id).id, tuple(get_family(family_id).validate(params).items()))

    @property
    def params_dict(self) -> dict[str, float | int]:
        return dict(self.params)

    def __str__(self) -> str:
        from calft.prompts import format_param

        return f"{self.family_id}(" + ", ".join(f"{k}={format_param(v)}" for k, v in self.params) + ")"


def even_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n): np.linspace(0, n-1, k, dtype=int).

    The artifact's `_evenly_subsample`: truncation of the float grid i * ((n-1)/(k-1)), which is
    floor(i (n-1)/(k-1)) except where float rounding falls just below an integer. k = 1 keeps
    index 0 (linspace's first point).
    """
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return np.linspace(0, n - 1, k).astype(np.int64).tolist()


def spread_indices(shape: tuple[int, ...], k: int) -> list[int]:
    """k flat indices (cartesian order) of a grid of `shape` that spread over every axis at once:
    a Latin hypercube. Point i takes, on axis j, the stratum (i * step_j) mod k with steps that
    are coprime with k (1, then the integers nearest k/phi, k/phi^2, ...), so each axis sees k
    distinct evenly spaced quantiles and the axes are not aligned (3 points of a 2-axis grid:
    low/low, mid/high, high/mid). `even_indices` on the flat order would instead vary only the
    last axes for small k.
    """
    steps, target = [], float(k)
    for _ in shape:
        step = max(1, round(target))
        while math.gcd(step, k) != 1:
            step += 1
        steps.append(step % k if k > 1 else 0)
        target /= (1 + 5 ** 0.5) / 2
    steps[0] = 1
    flat = []
    for i in range(k):
        idx = [((i * st) % k * 2 + 1) * n // (2 * k) for st, n in zip(steps, shape)]
        f = 0
        for j, n in zip(idx, shape):
            f = f * n + j
        flat.append(f)
    return sorted(set(flat))


def get_split(
    name: str, *, families: Iterable[str] | None = None, max_specs: int | None = None
) -> list[PromptSpec]:
    """The prompt specs of split `name`, family by family in the family table's order, grid order within.

    families: restrict to these family ids (must belong to the split: training families for
        train/test_unseen_params/test_selected, held-out ones for test_ood_family/ood_selected).
    max_specs: cap per family (default: 121 for train, triangular 125, 36 for test_unseen_params,
        none otherwise); larger grids are subsampled evenly by index.
    """
    if name not in _SPLIT_SOURCES:
        raise ValueError(f"unknown split {name!r}; known splits: {', '.join(SPLITS)}")
    grid_key, default_cap, held_out = _SPLIT_SOURCES[name]
    cap = default_cap if max_specs is None else max_specs
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"max_specs must be a positive integer or None, got {max_specs!r}")
    members = [fid for fid, fam in FAMILIES.items() if fam.held_out == held_out]
    if families is None:
        chosen = members
    else:
        if isinstance(families, str):
            families = [families]
        wanted = {get_family(f).id for f in families}
        outside = sorted(wanted.difference(members))
        if outside:
            kind = "held-out" if held_out else "training"
            raise ValueError(f"split {name!r} holds only {kind} families; not in it: {', '.join(outside)}")
        chosen = [fid for fid in members if fid in wanted]
    specs: list[PromptSpec] = []
    for fid in chosen:
        grid = GRIDS[fid][grid_key]
        points = grid.points()
        family_cap = _FAMILY_CAPS.get(name, {}).get(fid, cap) if max_specs is None else cap
        if family_cap is None or family_cap >= len(points):
            keep = range(len(points))
        elif grid_key == "within_range":
            keep = spread_indices(tuple(len(a) for a in grid.axes), family_cap)
        else:
            keep = even_indices(len(points), family_cap)
        for i in keep:
            specs.append(PromptSpec(fid, tuple(grid_point_to_params(fid, points[i]).items())))
    return specs


# ------------------------------------------------------------------------------------------------
# parameters drawn inside the training ranges (not the paper's: calft.train --param-draws)

def _geometric_axis(axis: tuple) -> bool:
    """True for an axis written log[a,b]xk (positive, constant ratio), so draws are log-uniform."""
    v = np.asarray(axis, dtype=float)
    if v.size < 3 or v.min() <= 0:
        return False
    ratios = v[1:] / v[:-1]
    return bool(np.allclose(ratios, ratios[0], rtol=1e-2)) and not np.allclose(np.diff(v), v[1] - v[0], rtol=1e-2)


def drawn_train_specs(family_id: str, count: int, seed: int = 0) -> list[PromptSpec]:
    """`count` prompts at parameters drawn at random inside the box of a family's training grid.

    Each grid axis is drawn independently: log-uniformly between its ends where the axis is
    geometric (log[a,b]xk), uniformly otherwise; counts are rounded and every value snapped to the
    printed 4 significant digits, as the grids are. A draw that equals a prompt of the train grid or
    of any test split (compared as printed prompt parameters) is dropped and drawn again, so the
    test splits stay unseen. Deterministic in (family_id, count, seed).
    """
    fid = get_family(family_id).id
    grid = GRIDS[fid].get("train")
    if grid is None:
        raise ValueError(f"family {fid!r} has no training grid")
    if count <= 0:
        return []
    counts = {p.name for p in get_family(fid).params if p.integer}
    taken = {sp for split in ("train", "test_unseen_params", "test_within_range", "test_selected")
             for sp in get_split(split, families=[fid], max_specs=10 ** 9)}  # every point, no cap
    # per axis: (name, low, high, drawn in log space)
    axes = [(name, float(min(axis)), float(max(axis)), _geometric_axis(axis)) for name, axis in zip(grid.names, grid.axes)]
    rng = np.random.default_rng([seed, *fid.encode()])
    specs: list[PromptSpec] = []
    for _ in range(100 * count):
        if len(specs) == count:
            break
        point = {}
        for name, lo, hi, geometric in axes:
            v = math.exp(rng.uniform(math.log(lo), math.log(hi))) if geometric else rng.uniform(lo, hi)
            point[name] = int(round(v)) if name in counts else snap_number(v)
        try:
            spec = PromptSpec(fid, tuple(grid_point_to_params(fid, point).items()))
        except ValueError:  # a combination the family refuses (none inside a valid training box so far)
            continue
        if spec not in taken:
            taken.add(spec)
            specs.append(spec)
    return specs
