"""Prompt splits (SPEC.md section 2): which (family, parameters) pairs each split holds.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from calft.families import FAMILIES, GRIDS, get_family, grid_point_to_params

SPLITS = ("train", "test_unseen_params", "test_within_range", "test_selected", "test_ood_family",
          "ood_selected")

# split -> (key in calft.families.GRIDS, default max_specs per family, held-out families?)
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
        from calft.prompts import format_number

        return f"{self.family_id}(" + ", ".join(f"{k}={format_number(v)}" for k, v in self.params) + ")"


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
    import math

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
    """The prompt specs of split `name`, family by family in SPEC order, grid order within.

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
