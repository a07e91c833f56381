"""Every merge method against small hand-computed cases, and parameter validation."""

import pytest
import torch

from fedmerge import ConfigError
from fedmerge.merging import METHODS, get_method, merge


def sd(*values, dtype=torch.float32):
    return {"w": torch.tensor(values, dtype=dtype)}


def test_average_weighted_and_unnormalized():
    base, experts = sd(0.0, 0.0), [sd(1.0, 2.0), sd(3.0, 6.0)]
    assert merge("average", base, experts, [1, 3])["w"].tolist() == [2.5, 5.0]
    assert merge("average", base, experts, [1, 3], normalize=False)["w"].tolist() == [10.0, 20.0]


def test_task_arithmetic():
    out = merge("task_arithmetic", sd(1.0, 1.0), [sd(3.0, 0.0), sd(1.0, 5.0)], [1, 2],
                **{"lambda": 0.5})  # fmt: skip
    assert out["w"].tolist() == [2.0, 4.5]  # 1 + 0.5·(1·[2,-1] + 2·[0,4])


TIES_EXPERTS = [sd(3.0, -1.0, 0.5, -2.0), sd(-1.0, 2.0, 0.1, -4.0), sd(2.0, -3.0, -0.2, 1.0)]


def test_ties_trim_elect_disjoint_mean():
    # trimmed to top-2: [3,0,0,-2], [0,2,0,-4], [2,-3,0,0]; Σ = [5,-1,0,-6] -> signs + - + -
    out = merge("ties", sd(0.0, 0.0, 0.0, 0.0), TIES_EXPERTS, density=0.5)
    assert out["w"].tolist() == [2.5, -3.0, 0.0, -3.0]
    out = merge("ties", sd(0.0, 0.0, 0.0, 0.0), TIES_EXPERTS, density=0.5, normalize=False,
                **{"lambda": 2.0})  # fmt: skip
    assert out["w"].tolist() == [10.0, -6.0, 0.0, -12.0]  # 2·[5, -3, 0, -6] (disjoint sum)


def test_ties_weights_enter_election_and_mean():
    # weights [1, 1, 3]: weighted trimmed [3,0,0,-2],[0,2,0,-4],[6,-9,0,0]; Σ=[9,-7,0,-6]
    out = merge("ties", sd(0.0, 0.0, 0.0, 0.0), TIES_EXPERTS, [1, 1, 3], density=0.5)
    assert out["w"].tolist() == [9 / 4, -9 / 3, 0.0, -6 / 2]


def test_ties_global_scope_uses_one_threshold_per_expert():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    ex = {"a": torch.tensor([5.0, 4.0]), "b": torch.tensor([1.0, 2.0, 3.0])}
    # N=5, density 0.4: threshold = 3rd smallest |τ| = 3 (official TIES: keeps |τ| >= 3)
    out = merge("ties", base, [ex], density=0.4, scope="global")
    assert out["a"].tolist() == [5.0, 4.0] and out["b"].tolist() == [0.0, 0.0, 3.0]
    per_tensor = merge("ties", base, [ex], density=0.4)  # int(0.4·2)=0 and int(0.4·3)=1 kept
    assert per_tensor["a"].tolist() == [0.0, 0.0] and per_tensor["b"].tolist() == [0.0, 0.0, 3.0]


def test_dare_drops_and_rescales_seeded():
    base, ex = sd(*[0.0] * 1000), sd(*[2.0] * 1000)
    out = merge("dare_linear", base, [ex], density=0.25, seed=3)["w"]
    assert set(out.unique().tolist()) == {0.0, 8.0}  # kept entries ×1/0.25
    assert 0.18 < float((out != 0).float().mean()) < 0.32
    again = merge("dare_linear", base, [ex], density=0.25, seed=3)["w"]
    other = merge("dare_linear", base, [ex], density=0.25, seed=4)["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)
    none = merge("dare_linear", base, [ex], density=0.25, seed=3, rescale="none")["w"]
    assert torch.equal(none * 4, out)
    l1 = merge("dare_linear", base, [ex], density=0.25, seed=3, rescale="l1")["w"]
    assert float(l1.sum()) == pytest.approx(2000.0)  # L1 norm restored


def test_dare_ties_elects_after_dropping():
    base = sd(0.0, 0.0)
    out = merge("dare_ties", base, [sd(1.0, -1.0), sd(-3.0, 2.0)], density=1.0, normalize=True)
    assert out["w"].tolist() == [-3.0, 2.0]  # Σ = [-2, 1]: only the agreeing expert remains


def test_breadcrumbs_drops_both_tails():
    tau = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0, -10.0]
    base = sd(*[0.0] * 10)
    out = merge("breadcrumbs", base, [sd(*tau)], density=0.6, gamma=0.1)["w"]
    assert out.tolist() == [0, 0, 0, -4, 5, -6, 7, -8, 9, 0]  # bottom 3 and top 1 dropped
    out = merge("breadcrumbs", base, [sd(*tau)], density=0.95, gamma=0.1)["w"]
    assert out.tolist() == tau[:9] + [0.0]  # n_bot < 0: fewer large ones dropped
    out = merge("breadcrumbs", base, [sd(*tau)], density=0.5, gamma=0.0)["w"]
    assert out.tolist() == [0] * 5 + tau[5:]  # gamma 0: plain magnitude trimming


def test_breadcrumbs_ties():
    base = sd(0.0, 0.0, 0.0, 0.0)
    a, b = sd(1.0, 2.0, -3.0, 4.0), sd(-1.0, -2.5, 3.5, 4.5)
    # density 0.5 gamma 0.25: keep 2nd and 3rd largest: a -> [0,2,-3,0], b -> [0,-2.5,3.5,0]
    out = merge("breadcrumbs_ties", base, [a, b], density=0.5, gamma=0.25)["w"]
    assert out.tolist() == [0.0, -2.5, 3.5, 0.0]


def test_magmax_picks_largest_weighted_entry():
    base, experts = sd(0.0, 0.0), [sd(1.0, -3.0), sd(-2.0, 2.0)]
    assert merge("magmax", base, experts)["w"].tolist() == [-1.0, -1.5]
    out = merge("magmax", base, experts, [3, 1], **{"lambda": 1.0})["w"]
    assert out.tolist() == [3.0, -9.0]


def test_fisher_weighted_average():
    base, experts = sd(0.0, 0.0), [sd(1.0, 1.0), sd(3.0, 3.0)]
    fisher = [sd(1.0, 0.0), sd(1.0, 2.0)]
    assert merge("fisher", base, experts, fisher=fisher, epsilon=0.0)["w"].tolist() == [2.0, 3.0]
    assert merge("fisher", base, experts, fisher=fisher, epsilon=1.0)["w"].tolist() == [2.0, 2.5]
    out = merge("fisher", base, experts, [3, 1], fisher=fisher, epsilon=0.0)["w"]
    assert out.tolist() == [1.5, pytest.approx(1 * 0 + 3.0)]  # (3·1+1·3)/4, (0+2·3)/2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_integer_and_bool_entries_pass_through_from_reference(method):
    base = {"w": torch.zeros(3), "n": torch.tensor(5), "m": torch.tensor([True, False])}
    experts = [{"w": torch.ones(3), "n": torch.tensor(9), "m": torch.tensor([False, True])}] * 2
    fisher = [{"w": torch.ones(3)}] * 2 if METHODS[method].needs_fisher else ()
    out = merge(method, base, experts, fisher=fisher)
    assert int(out["n"]) == 5 and out["m"].tolist() == [True, False]


def test_low_precision_computes_in_float32_and_casts_at_the_end():
    base = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    experts = [{"w": torch.tensor([1.5, 2.5], dtype=torch.bfloat16)}] * 3
    out = merge("task_arithmetic", base, experts, **{"lambda": 1 / 3})
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.5, 2.5]
    out32 = merge("task_arithmetic", base, experts, dtype=torch.float32)
    assert out32["w"].dtype == torch.float32
    f64 = merge("average", sd(0.1, 0.2, dtype=torch.float64), [sd(0.3, 0.4, dtype=torch.float64)])
    assert f64["w"].dtype == torch.float64 and f64["w"].tolist() == [0.3, 0.4]


@pytest.mark.parametrize(
    ("method", "params", "match"),
    [
        ("nope", {}, "unknown merge method 'nope'"),
        ("ties", {"dens": 0.2}, "no parameter 'dens'"),
        ("ties", {"density": 1.5}, r"'density' must be in \(0, 1\]"),
        ("ties", {"density": 0}, r"'density' must be in \(0, 1\]"),
        ("ties", {"density": "abc"}, "'density' must be float"),
        ("ties", {"scope": "model"}, r"'scope' must be one of \['tensor', 'global'\]"),
        ("dare_linear", {"seed": -1}, "'seed' must be in"),
        ("dare_linear", {"seed": 1.5}, "'seed' must be int"),
        ("average", {"normalize": "maybe"}, "'normalize' must be bool"),
        ("task_arithmetic", {"lambda": float("nan")}, "'lambda' must be finite"),
    ],
)
def test_bad_method_or_parameter_is_named(method, params, match):
    with pytest.raises(ConfigError, match=match):
        merge(method, sd(0.0), [sd(1.0)], **params)


def test_bad_weights_and_fisher_usage():
    with pytest.raises(ConfigError, match="2 weight"):
        merge("average", sd(0.0), [sd(1.0)], [1, 2])
    with pytest.raises(ConfigError, match="weights >= 0"):
        merge("average", sd(0.0), [sd(1.0), sd(2.0)], [1, -1])
    with pytest.raises(ConfigError, match="one Fisher file per expert"):
        merge("fisher", sd(0.0), [sd(1.0)])
    with pytest.raises(ConfigError, match="takes no Fisher"):
        merge("ties", sd(0.0), [sd(1.0)], fisher=[sd(1.0)])


def test_string_parameters_parse_like_the_cli():
    p = get_method("ties").resolve({"density": "0.3", "normalize": "false", "scope": "global"})
    assert p == {"density": 0.3, "lambda": 1.0, "normalize": False, "scope": "global"}


def test_bad_fisher_values_and_output_overflow_are_named():
    from fedmerge import ValidationError

    with pytest.raises(ValidationError, match="fisher 1: Fisher 'w' has negative"):
        merge("fisher", sd(0.0), [sd(1.0), sd(2.0)], fisher=[sd(1.0), sd(-1.0)])
    with pytest.raises(ValidationError, match=r"merged output \(torch.float16\): 'w'"):
        merge("task_arithmetic", sd(0.0), [sd(1e5)], dtype=torch.float16, **{"lambda": 1.0})
    with pytest.raises(ValidationError, match="expert 1: 'w' has non-finite"):
        merge("average", sd(0.0), [sd(1.0), sd(float("nan"))])
