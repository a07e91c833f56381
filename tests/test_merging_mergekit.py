"""fedmerge's methods against mergekit's outputs on committed fixtures.

The fixtures in tests/fixtures/mergekit/ were produced by ``mergekit-pytorch``
(see the README there); each case's config is in ``cases.json``.
"""

import json
from pathlib import Path

import pytest
import torch

from fedmerge import load_state_dict
from fedmerge.merging import merge
from fedmerge.merging.sparsify import apply_drop

FIX = Path(__file__).parent / "fixtures" / "mergekit"
CASES = json.loads((FIX / "cases.json").read_text())["cases"]


def inputs(case: dict):
    experts = [load_state_dict(FIX / m["model"]) for m in case["models"]]
    weights = [m["parameters"]["weight"] for m in case["models"]]
    per_model = {k: v for k, v in case["models"][0]["parameters"].items() if k != "weight"}
    family = case["models"][0]["model"].split("_")[0]
    base = load_state_dict(FIX / f"{family}_base.safetensors")
    return base, experts, weights, {**case["parameters"], **per_model}


# mergekit name -> (fedmerge method, extra fedmerge params making the definitions equal)
SAME = {
    "linear": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}),
    "ties": ("ties", {}),
    "ties_sum": ("ties", {}),
    "dare_linear_d1": ("dare_linear", {}),
    "dare_ties_d1": ("dare_ties", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_deterministic_cases_match_mergekit(name):
    base, experts, weights, params = inputs(CASES[name])
    method, extra = SAME[name]
    params = {**params, **extra, **({"lambda": 1.0} if "lambda" not in params else {})}
    if method == "average":
        params.pop("lambda")
    got = merge(method, base, experts, weights, **params)
    want = load_state_dict(FIX / f"{name}.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
    # the fixtures must exercise the method: the merge differs from plain task arithmetic
    if name not in ("linear", "task_arithmetic", "dare_linear_d1"):
        ta = merge("task_arithmetic", base, experts, weights, **{"lambda": 1.0})
        assert any((ta[k] - want[k]).abs().max() > 1e-3 for k in want)


def test_dare_rescale_l1_matches_mergekit_on_its_own_mask():
    """One expert, density 0.3: mergekit's kept entries are exactly τ·‖τ‖₁/‖τ⊙m‖₁.

    Recovering mergekit's mask m from its output and applying fedmerge's
    ``rescale: l1`` with that mask reproduces the output to 1e-6; the mask's
    keep rate is binomial(n, 0.3) (within 5σ)."""
    base, experts, _, params = inputs(CASES["dare_linear_big"])
    want = load_state_dict(FIX / "dare_linear_big.safetensors")["w"]
    tau = (experts[0]["w"] - base["w"]).reshape(1, -1)
    keep = (want - base["w"]).reshape(1, -1) != 0
    n, rate = keep.numel(), float(keep.float().mean())
    assert abs(rate - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    ours = base["w"] + apply_drop(tau.clone(), keep, 0.3, "l1").reshape(base["w"].shape)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-6)


def test_dare_ties_statistics_match_mergekit():
    """Three experts, density 0.3: masks differ (different RNGs), so compare statistics:
    the fraction of changed entries and the mean |Δ| agree with fedmerge's
    ``rescale: l1`` merge within a few percent."""
    base, experts, weights, params = inputs(CASES["dare_ties_big"])
    want = load_state_dict(FIX / "dare_ties_big.safetensors")["w"] - base["w"]
    got = merge("dare_ties", base, experts, weights, rescale="l1", **params)["w"] - base["w"]
    for stat in (lambda d: (d != 0).float().mean(), lambda d: d.abs().mean(), lambda d: d.std()):
        a, b = float(stat(got)), float(stat(want))
        assert abs(a - b) < 0.03 * abs(b)
