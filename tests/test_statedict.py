"""Task vectors, spec validation, hashing."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmerge import (
    ValidationError,
    add_task_vector,
    check_finite,
    check_same_specs,
    global_norm,
    state_hash,
    task_vector,
)
from fedmerge.statedict import specs_of


def test_task_vector_skips_integer_entries_and_roundtrips():
    ref = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    theta = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(9)}
    tau = task_vector(theta, ref)
    assert list(tau) == ["w"] and tau["w"].tolist() == [3.0, -2.0]
    back = add_task_vector(ref, tau)
    assert back["w"].tolist() == [4.0, 0.0] and int(back["n"]) == 3  # ints come from ref


@pytest.mark.parametrize(
    ("other", "match"),
    [
        ({"w": torch.zeros(2)}, "missing key 'b'"),
        ({"w": torch.zeros(2), "b": torch.zeros(1), "c": torch.zeros(1)}, "unexpected key 'c'"),
        ({"w": torch.zeros(3), "b": torch.zeros(1)}, r"'w' has shape \[3\]"),
        ({"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1)}, "'w' has dtype"),
    ],
)
def test_check_same_specs_names_the_key(other, match):
    ref = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValidationError, match=match):
        check_same_specs(specs_of(ref), specs_of(other), source="expert.safetensors")


def test_check_finite():
    check_finite(torch.ones(3), "w", "peer 1")
    with pytest.raises(ValidationError, match=r"peer 1: 'w' has 2 non-finite"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "w", "peer 1")


def test_global_norm_hand_computed():
    assert global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "n": torch.tensor(9)}) == 5.0


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=8))
def test_hash_changes_with_any_value(values):
    a = {"w": torch.tensor(values)}
    b = {"w": torch.tensor(values)}
    assert state_hash(a) == state_hash(b)
    b["w"][0] += 1.0
    assert state_hash(a) != state_hash(b)
