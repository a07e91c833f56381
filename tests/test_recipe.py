"""The one recipe runner (fedmerge.recipe): a toy recipe runs the same way from its own
command line and from `fedmerge sweep`, with one-line errors and nothing written on error."""

import json
import textwrap

import pytest

from fedmerge.cli import main as fedmerge_main
from fedmerge.errors import ConfigError
from fedmerge.recipe import load_script, recipe_of

TOY = """
from dataclasses import dataclass
from fedmerge.config import POSITIVE, option
from fedmerge.recipe import Recipe
from fedmerge.report import write_json

@dataclass
class ToyConfig:
    n: int = option(3, "how many squares", check=POSITIVE)
    out: str = option("runs/toy", "output directory")

def run(cfg, tick):
    out = []
    for i in range(cfg.n):
        out.append(i * i)
        tick(f"square {i}")
    return out

def write(squares, out):
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "squares.json", squares)
    return {"json": out / "squares.json"}

def show(squares, console):
    console.print(f"sum of squares: {sum(squares)}")

RECIPE = Recipe("toy", ToyConfig, run=run, units=lambda cfg: cfg.n, write=write, show=show)
"""


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "run.py").write_text(textwrap.dedent(TOY))
    (tmp_path / "toy.yaml").write_text("recipe: run.py\nn: 4\n")
    return tmp_path


def test_sweep_and_the_script_run_the_same_recipe(toy, capsys):
    assert fedmerge_main(["sweep", str(toy / "toy.yaml"), "--out", str(toy / "a")]) == 0
    assert json.loads((toy / "a" / "squares.json").read_text()) == [0, 1, 4, 9]
    assert "sum of squares: 14" in capsys.readouterr().out
    recipe = load_script(toy / "run.py").RECIPE
    assert recipe.main(["--config", str(toy / "toy.yaml"), "--set", "n=2", "--out",
                        str(toy / "b")]) == 0  # fmt: skip
    assert json.loads((toy / "b" / "squares.json").read_text()) == [0, 1]
    ticks = []
    assert recipe.run(recipe.load(toy / "toy.yaml"), ticks.append) == [0, 1, 4, 9]
    assert ticks == [f"square {i}" for i in range(4)]


def test_errors_are_one_line_and_write_nothing(toy, capsys):
    recipe = load_script(toy / "run.py").RECIPE
    assert recipe.main(["--config", str(toy / "toy.yaml"), "--set", "n=0",
                        "--out", str(toy / "c")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("toy: error: n: must be") and err.endswith(", got 0\n")
    assert err.count("\n") == 1 and not (toy / "c").exists()
    assert fedmerge_main(["sweep", str(toy / "toy.yaml"), "--seeds", "0,1"]) == 2
    assert "a recipe config runs once" in capsys.readouterr().err


def test_what_is_and_is_not_a_recipe(toy):
    assert recipe_of("simulations/protocols_digits.yaml") is None
    assert recipe_of(toy / "toy.yaml").name == "toy"
    (toy / "bare.py").write_text("X = 1\n")
    (toy / "bare.yaml").write_text("recipe: bare.py\n")
    with pytest.raises(ConfigError, match="recipe script bare.py defines no RECIPE"):
        recipe_of(toy / "bare.yaml")
    with pytest.raises(ConfigError, match="recipe script .*missing.py not found"):
        load_script(toy / "missing.py")
