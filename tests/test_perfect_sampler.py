"""benchmarks/perfect_sampler.py: draws from the target scored like a model; the slope is unbiased
(its mean over repeats is 1 within its standard error) and F's is far noisier than Uniform's."""
import json
import math

from benchmarks import perfect_sampler


def test_perfect_sampler_scores_near_the_ceiling_with_family_noise(tmp_path):
    out = tmp_path / "perfect.json"
    result = perfect_sampler.main(["--families", "uniform,f_distribution", "--prompts-per-family", "6",
                                   "--samples", "50", "--repeats", "40", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    slopes = result["family_slope"]
    for fam in ("uniform", "f_distribution"):
        r = slopes[fam]
        assert abs(r["mean"] - 1.0) < 4 * r["sd"] / math.sqrt(40) + 1e-9, (fam, r)  # E[slope] = 1: unbiased
    assert slopes["f_distribution"]["sd"] > 5 * slopes["uniform"]["sd"]
    assert slopes["uniform"]["miss_rate"] == 0.0
    assert result["pooled"]["in_support_rate"]["mean"] == 1.0 and result["pooled"]["in_support_rate"]["miss_rate"] == 0.0
    assert result["pooled"]["median_sample_ks"]["mean"] < 0.2
