"""calft.splits: sizes, the selected rows of docs/method.md, even subsampling, determinism, errors."""

import collections

import numpy as np
import pytest

from calft.families import FAMILIES, HELD_OUT_FAMILY_IDS, TRAIN_FAMILY_IDS, get_family
from calft.prompts import format_param
from calft.splits import GRIDS, SPLITS, PromptSpec, even_indices, get_split, grid_point_to_params, lin, log

# docs/method.md, section 'Families and grids', "selected" column and ood_selected, in prompt parameterization
SELECTED = {
    "uniform": {"a": 3.5, "b": 10.5},
    "gaussian": {"mu": 3.5, "sigma": 3},
    "beta": {"alpha": 7, "beta": 7},
    "binomial": {"n": 25, "p": 0.5},
    "exponential": {"lambda": 7},
    "geometric": {"p": 0.125},
    "negative_binomial": {"r": 15, "p": 0.15},
    "lognormal": {"mu": 2.5, "sigma": 2},
    "triangular": {"a": 2.5, "c": 6, "b": 9.5},
    "rayleigh": {"sigma": 3},
    "cauchy": {"x0": 3.5, "gamma": 3},
    "student_t": {"nu": 16},
    "chi_square": {"nu": 32},
    "f_distribution": {"d1": 12, "d2": 24},
    "gamma": {"alpha": 7, "beta": 7},
    "laplace": {"mu": 3.5, "b": 3},
    "logistic": {"mu": 3.5, "s": 3},
    "pareto": {"alpha": 6.5, "xm": 3.5},
    "hypergeometric": {"M": 100, "K": 50, "N": 20},
    "gumbel": {"mu": 3.5, "beta": 3},
    "skellam": {"mu1": 10.5, "mu2": 10.5},
    "beta_binomial": {"n": 40, "alpha": 6.5, "beta": 6.5},
    "lomax": {"alpha": 6, "lambda": 4.5},
    "inverse_gaussian": {"mu": 5, "lambda": 7},
}
OOD_SELECTED = [
    ("bernoulli", {"p": 0.1}), ("bernoulli", {"p": 0.5}), ("bernoulli", {"p": 0.9}),
    ("poisson", {"lambda": 1}), ("poisson", {"lambda": 4}), ("poisson", {"lambda": 12}),
    ("maxwell", {"scale": 0.75}), ("maxwell", {"scale": 1.5}), ("maxwell", {"scale": 2.5}),
    ("truncnorm", {"mu": 0, "sigma": 1, "lower": -1, "upper": 1}),
    ("truncnorm", {"mu": 0, "sigma": 1, "lower": -2, "upper": 2}),
    ("truncnorm", {"mu": 1, "sigma": 1.5, "lower": -1, "upper": 2}),
    ("weibull", {"k": 0.5, "lambda": 0.5}), ("weibull", {"k": 1.5, "lambda": 1.5}), ("weibull", {"k": 3, "lambda": 3}),
    ("chi", {"df": 2}), ("chi", {"df": 5}), ("chi", {"df": 10}),
]

TRAIN_SIZES = {  # cartesian grid sizes, capped at 121 (triangular: 125, the artifact's cap: all of 5*5*5)
    "uniform": 121, "gaussian": 121, "beta": 121, "binomial": 44, "exponential": 25, "geometric": 13,
    "negative_binomial": 44, "lognormal": 121, "triangular": 125, "rayleigh": 25, "cauchy": 121,
    "student_t": 12, "chi_square": 13, "f_distribution": 16, "gamma": 121, "laplace": 121, "logistic": 121,
    "pareto": 99, "hypergeometric": 45, "gumbel": 121, "skellam": 121, "beta_binomial": 75, "lomax": 121,
    "inverse_gaussian": 121,
}


def _counts(specs):
    return dict(collections.Counter(s.family_id for s in specs))


def test_split_sizes():
    sizes = {name: len(get_split(name)) for name in SPLITS}
    # 1988 train prompts, as the artifact (its conf/data/calibrate_sft.yaml caps triangular at 125)
    assert sizes == {"train": 1988, "test_unseen_params": 591, "test_within_range": 680, "test_selected": 24,
                     "test_ood_family": 92, "ood_selected": 18}
    assert _counts(get_split("train")) == TRAIN_SIZES
    assert _counts(get_split("test_ood_family")) == {
        "bernoulli": 5, "poisson": 17, "maxwell": 9, "truncnorm": 16, "weibull": 36, "chi": 9,
    }
    unseen = _counts(get_split("test_unseen_params"))
    assert max(unseen.values()) == 36 and unseen["triangular"] == 27 and unseen["beta_binomial"] == 18


def test_selected_rows_match_spec():
    got = {s.family_id: s.params_dict for s in get_split("test_selected")}
    assert list(got) == list(TRAIN_FAMILY_IDS)
    assert got == SELECTED
    assert [(s.family_id, s.params_dict) for s in get_split("ood_selected")] == OOD_SELECTED


def test_family_membership_and_order():
    for name in ("train", "test_unseen_params", "test_selected"):
        assert list(dict.fromkeys(s.family_id for s in get_split(name))) == list(TRAIN_FAMILY_IDS)
    for name in ("test_ood_family", "ood_selected"):
        assert list(dict.fromkeys(s.family_id for s in get_split(name))) == list(HELD_OUT_FAMILY_IDS)


def test_deterministic_and_unique():
    for name in SPLITS:
        a, b = get_split(name), get_split(name)
        assert a == b and len(set(a)) == len(a)
    assert not set(get_split("train")) & set(get_split("test_unseen_params"))


def _artifact_subsample(rows, max_items):
    """The artifact's `_evenly_subsample` (chandar-lab/calibration-finetuning, calibrate_sft/data.py)."""
    if max_items <= 0 or len(rows) <= max_items:
        return rows
    return [rows[int(i)] for i in np.linspace(0, len(rows) - 1, num=max_items, dtype=int)]


def test_even_indices_are_the_artifacts():
    for n, k in [(125, 121), (121, 121), (10, 3), (1000, 7), (36, 36), (5, 10), (7, 2), (9, 1), (1016, 1001)]:
        idx = even_indices(n, k)
        assert idx == _artifact_subsample(list(range(n)), k), (n, k)
        assert len(set(idx)) == len(idx) and idx[0] == 0
    # truncation, not rounding: 3 of 10 -> 0, 4 (4.5 truncated), 9
    assert even_indices(10, 3) == [0, 4, 9]
    # float rounding as the artifact: i = 200 of (1016, 1001) is exactly 203 but linspace gives 202
    assert even_indices(1016, 1001)[200] == 202


def test_smaller_caps_subsample_like_the_artifact():
    for fid in ("triangular", "gaussian", "pareto"):
        full = get_split("train", families=[fid], max_specs=1000)
        for cap in (7, 36, 121):
            assert get_split("train", families=[fid], max_specs=cap) == _artifact_subsample(full, cap), (fid, cap)


def test_triangular_keeps_its_whole_grid():
    tri = get_split("train", families=["triangular"])
    assert len(tri) == 125
    assert tri[0].params_dict == {"a": -3.0, "c": -2.9, "b": -2.0}  # a=-3, width=1, mf=.1
    assert tri[-1].params_dict == {"a": 1.0, "c": 5.5, "b": 6.0}  # a=1, width=5, mf=.9
    assert len(get_split("train", families=["triangular"], max_specs=121)) == 121


def test_families_filter_and_max_specs():
    specs = get_split("train", families=["gamma", "beta"], max_specs=10)
    assert _counts(specs) == {"beta": 10, "gamma": 10}  # family-table order, not request order
    assert [s.family_id for s in specs][:1] == ["beta"]
    # one of 121: np.linspace(0, 120, 1) = [0], the first grid point (as the artifact)
    assert get_split("train", families="beta", max_specs=1)[0].params_dict == {"alpha": 0.5, "beta": 0.5}
    assert len(get_split("test_ood_family", families=["chi"], max_specs=4)) == 4


def test_split_errors():
    with pytest.raises(ValueError, match="unknown split 'trian'"):
        get_split("trian")
    with pytest.raises(ValueError, match="holds only training families; not in it: poisson"):
        get_split("train", families=["poisson"])
    with pytest.raises(ValueError, match="holds only held-out families"):
        get_split("ood_selected", families=["gaussian"])
    with pytest.raises(ValueError, match="did you mean 'gaussian'"):
        get_split("train", families=["gausian"])
    with pytest.raises(ValueError, match="max_specs"):
        get_split("train", max_specs=0)


def test_prompt_spec_is_hashable_and_prints_exact_values():
    spec = PromptSpec.make("binomial", {"p": 0.5, "n": 25.0})
    assert spec == PromptSpec("binomial", (("n", 25), ("p", 0.5)))
    assert hash(spec) == hash(PromptSpec("binomial", (("n", 25), ("p", 0.5))))
    assert str(spec) == "binomial(n=25, p=0.5)"
    # every parameter of every split prints exactly (the prompt describes the target exactly)
    for name in SPLITS:
        for s in get_split(name):
            for key, value in s.params:
                assert float(format_param(value)) == value, (s, key)


def test_grid_spacing_and_snapping():
    assert lin(-5, 2, 11) == (-5.0, -4.3, -3.6, -2.9, -2.2, -1.5, -0.8, -0.1, 0.6, 1.3, 2.0)
    g = log(0.5, 2, 11)
    assert g[0] == 0.5 and g[-1] == 2.0 and g[5] == 1.0
    exact = np.geomspace(0.5, 2, 11)
    np.testing.assert_allclose(g, exact, rtol=5e-4)  # 4 significant digits
    assert all(float(f"{x:.4g}") == x for x in g)


def test_grid_only_parameterizations():
    assert grid_point_to_params("uniform", {"a": -4.3, "width": 1.4}) == {"a": -4.3, "b": -2.9}
    assert grid_point_to_params("triangular", {"a": 2.5, "width": 7, "mode_fraction": 0.5}) == {
        "a": 2.5, "c": 6.0, "b": 9.5,
    }
    hyper = grid_point_to_params("hypergeometric", {"M": 80, "N": 15, "success_fraction": 0.35})
    assert hyper == {"M": 80, "K": 28, "N": 15}
    assert grid_point_to_params("hypergeometric", {"M": 30, "N": 50, "success_fraction": 0.2}) == {
        "M": 30, "K": 6, "N": 30,  # N = min(N, M)
    }


def test_grid_sizes_match_spec():
    sizes = {fid: {k: len(g) for k, g in grids.items()} for fid, grids in GRIDS.items()}
    assert set(sizes) == set(FAMILIES)
    assert sizes["triangular"] == {"train": 125, "test_unseen_params": 27, "selected": 1, "within_range": 64}
    assert sizes["exponential"] == {"train": 25, "test_unseen_params": 12, "selected": 1, "within_range": 24}
    assert sizes["pareto"]["train"] == 99 and sizes["hypergeometric"]["train"] == 45
    assert sizes["chi_square"] == {"train": 13, "test_unseen_params": 6, "selected": 1, "within_range": 12}
    assert sizes["poisson"] == {"ood": 17, "ood_selected": 3} and sizes["weibull"]["ood"] == 36
    for fid in TRAIN_FAMILY_IDS:
        assert set(sizes[fid]) == {"train", "test_unseen_params", "selected", "within_range"}
    for fid in HELD_OUT_FAMILY_IDS:
        assert set(sizes[fid]) == {"ood", "ood_selected"}


def test_every_grid_point_is_valid():
    for fid, grids in GRIDS.items():
        for grid in grids.values():
            for point in grid.points():
                params = grid_point_to_params(fid, point)
                dist = get_family(fid).frozen(params)
                assert np.isfinite(dist.ppf(0.5)), (fid, params)


def test_drawn_train_specs_stay_inside_the_training_box_and_off_every_test_prompt():
    """calft.train --param-draws: draws inside each axis's training range, log-uniform on geometric
    axes (scipy's loguniform as the oracle), uniform on linear ones, counts as integers, never a
    grid or test prompt, deterministic in the seed."""
    from scipy import stats

    from calft.splits import drawn_train_specs

    specs = drawn_train_specs("beta_binomial", 2000, seed=3)
    assert len(specs) == len(set(specs)) == 2000
    assert specs == drawn_train_specs("beta_binomial", 2000, seed=3)
    assert specs != drawn_train_specs("beta_binomial", 2000, seed=4)
    n = np.array([s.params_dict["n"] for s in specs])
    alpha = np.array([s.params_dict["alpha"] for s in specs])
    assert n.dtype.kind == "i" and n.min() == 10 and n.max() == 30  # the grid's n: 10, 20, 30
    assert alpha.min() >= 0.5 and alpha.max() <= 5
    assert stats.kstest(alpha, stats.loguniform(0.5, 5).cdf).pvalue > 1e-3  # log-uniform, not uniform
    assert stats.kstest(alpha, stats.uniform(0.5, 4.5).cdf).pvalue < 1e-6
    unseen = {sp for split in ("train", "test_unseen_params", "test_within_range", "test_selected")
              for sp in get_split(split, families=["beta_binomial", "hypergeometric"], max_specs=None)}
    # hypergeometric's prompt parameters are integers: draws collide with test prompts often, and are redrawn
    hyper = drawn_train_specs("hypergeometric", 300, seed=0)
    assert len(hyper) == 300 and not unseen.intersection(specs + hyper)
    for sp in hyper:
        M, K, N = (sp.params_dict[k] for k in ("M", "K", "N"))
        assert 30 <= M <= 80 and 5 <= N <= 15 and round(0.2 * M) - 1 <= K <= round(0.8 * M) + 1
    assert drawn_train_specs("gaussian", 0) == []
    with pytest.raises(ValueError, match="no training grid"):
        drawn_train_specs("weibull", 5)  # a held-out family
