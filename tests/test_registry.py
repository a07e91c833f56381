"""The one registry idiom (fedmerge.registry): parameters, defaults, ranges, messages."""

import pytest

from fedmerge.errors import ConfigError
from fedmerge.registry import Param, Registry, parse_assignments


def _shapes() -> Registry:
    reg = Registry("shape", field="shape.name")

    @reg.register(
        "box",
        Param("side", float, 1.0, "side length", low=0.0, low_open=True),
        Param("sides", tuple, (2, 3), "extra sides", low=1),
        Param("fill", str, "none", "fill style", choices=("none", "solid")),
        Param("closed", bool, True, "closed outline"),
    )
    def box(side: float, sides: tuple[int, ...], fill: str, closed: bool) -> tuple:
        """A box.

        Second paragraph is not part of the doc."""
        return side, sides, fill, closed

    return reg


def test_register_lookup_and_build() -> None:
    reg = _shapes()
    assert list(reg) == ["box"] and len(reg) == 1 and "box" in reg
    entry = reg.lookup("box")
    assert entry.doc == "A box." and entry.kind == "shape" and entry.owner == "shape 'box'"
    assert entry.defaults() == {"side": 1.0, "sides": (2, 3), "fill": "none", "closed": True}
    got = reg.build("box", {"side": "2.5", "sides": ["4", 5], "closed": "off"})
    assert got == (2.5, (4, 5), "none", False)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"side": 0}, r"shape 'box': parameter 'side' must be in \(0, inf\), got 0.0"),
        ({"side": float("inf")}, "'side' must be finite"),
        ({"side": "x"}, "'side' must be float, got 'x'"),
        ({"sides": [0]}, r"'sides' must be in \[1, inf\), got 0"),
        ({"sides": "12"}, "'sides' must be a list of int"),
        ({"sides": [1.5]}, "'sides' must be int, got 1.5"),
        ({"fill": "dots"}, r"'fill' must be one of \['none', 'solid'\]"),
        ({"closed": "maybe"}, "'closed' must be bool"),
        ({"colour": 1}, "shape 'box' has no parameter 'colour' \\(parameters: side, sides"),
    ],
)
def test_bad_parameters_name_entry_and_parameter(given: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _shapes().resolve("box", given)


def test_unknown_name_and_duplicates() -> None:
    reg = _shapes()
    with pytest.raises(ConfigError, match="shape.name: unknown shape 'ball'; known: box"):
        reg.lookup("ball")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("box", object)
    with pytest.raises(ValueError, match="declared twice"):
        reg.add("other", object, Param("a", int, 0, ""), Param("a", int, 1, ""))


def test_range_text_and_assignments() -> None:
    assert Param("p", float, 0.5, "", low=0.0, high=1.0).range_text() == "[0, 1]"
    assert Param("p", float, 0.5, "", low=0.0, low_open=True).range_text() == "(0, inf)"
    assert Param("p", int, 0, "").range_text() == ""
    assert Param("p", tuple, (), "").type_text() == "list[int]"
    assert parse_assignments(["a=1", " b = x=y "]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="--param expects key=value"):
        parse_assignments(["a"])


def test_config_names_and_options_come_from_the_registries() -> None:
    from fedmerge.config import field_docs, load_config
    from fedmerge.continual import CONTINUAL_METHODS
    from fedmerge.data.datasets import DATASETS
    from fedmerge.models import MODELS

    docs = {name: doc for name, _, doc in field_docs()}
    assert docs["model.name"].endswith(f"({' | '.join(MODELS)})")
    assert docs["data.name"].endswith(f"({' | '.join(DATASETS)})")
    assert list(CONTINUAL_METHODS) == [
        "opcm", "continual_task_arithmetic", "running_average", "continual_ties", "magmax"
    ]  # fmt: skip
    assert load_config(None, ["model.name=pkg.mod:fn"]).model.name == "pkg.mod:fn"
    with pytest.raises(ConfigError, match=r"model.options: model 'mlp': parameter 'hidden' must"):
        load_config(None, ["model.options={hidden: [0]}"])
    with pytest.raises(ConfigError, match="data.options: dataset 'synthetic' has no parameter"):
        load_config(None, ["data.name=synthetic", "data.options={sample: 3}"])
    with pytest.raises(ConfigError, match="model.name: unknown model 'mpl'; use one of mlp, cnn"):
        load_config(None, ["model.name=mpl"])
