"""Recipes: short scripts under ``simulations/`` that compose the library, run one way.

A recipe script (torchtune-style: one file, a config dataclass and a few functions)
ends with::

    RECIPE = Recipe("continual", ContinualConfig, run=run, units=units, write=write, show=show,
                    doc=__doc__)

    if __name__ == "__main__":
        raise SystemExit(RECIPE.main())

and its YAML configs name it with a top-level ``recipe: run.py`` (a path relative to
the YAML file). The same config then runs either way, with the same numbers::

    python simulations/continual/run.py --config simulations/continual/digits.yaml
    fedmerge sweep simulations/continual/digits.yaml --set orders=2

:meth:`Recipe.main` does what every recipe needs: ``--config/--set/--out``, one torch
thread (the models are tiny), the progress bar, the files, the tables, and a one-line
error with exit status 2 for bad input.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console

from fedmerge.config import load_config
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.report import Tick, progress
from fedmerge.yamlio import read_mapping

RECIPE_KEY = "recipe"


@dataclass(frozen=True)
class Recipe:
    """A recipe: its config ``schema`` (a dataclass of :func:`~fedmerge.config.option`
    fields, with an ``out`` field) and four functions.

    ``run(cfg, tick)`` -> outcome, calling ``tick(label)`` ``units(cfg)`` times;
    ``write(outcome, out_dir)`` -> ``{kind: path}`` of the files written;
    ``show(outcome, console)`` prints the tables; ``doc`` is the ``--help`` text.
    """

    name: str
    schema: type
    run: Callable[[Any, Tick], Any]
    units: Callable[[Any], int]
    write: Callable[[Any, Path], dict[str, Path]]
    show: Callable[[Any, Console], None]
    doc: str = ""

    def load(self, path: str | Path | None, overrides: Sequence[str] = ()) -> Any:
        """The validated config: YAML ``path`` (None: the defaults) with ``a.b=c`` overrides."""
        raw = read_mapping(path) if path is not None else {}
        raw.pop(RECIPE_KEY, None)
        return load_config(raw, overrides, schema=self.schema)

    def execute(
        self, cfg: Any, out: str | Path | None = None, *, bar: bool = True
    ) -> tuple[Any, dict[str, Path]]:
        """Run ``cfg`` on one torch thread (tiny models: extra threads only contend for the
        cores) with a progress bar; write the files."""
        from fedmerge.threads import torch_threads

        with torch_threads(1), progress(self.units(cfg), self.name, enabled=bar) as tick:
            outcome = self.run(cfg, tick)
        return outcome, self.write(outcome, Path(out or cfg.out))

    def run_file(
        self, path: str | Path | None, overrides: Sequence[str] = (), out: str | Path | None = None
    ) -> int:
        """Load, run, write and show; print the files written."""
        outcome, paths = self.execute(self.load(path, overrides), out)
        console = Console(width=max(Console().width, 110))  # pipes default to 80 columns
        self.show(outcome, console)
        for kind, written in paths.items():
            console.print(f"{kind}: {written}", highlight=False)
        return 0

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The recipe's command line: ``--config``, ``--set`` (repeatable), ``--out``."""
        raw = argparse.RawDescriptionHelpFormatter
        parser = argparse.ArgumentParser(description=self.doc or self.name, formatter_class=raw)
        parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config field, e.g. --set seed=1")  # fmt: skip
        parser.add_argument("--out", help="output directory (overrides the config's 'out')")
        args = parser.parse_args(argv)
        try:
            return self.run_file(args.config, args.set, args.out)
        except FedmergeError as exc:
            print(f"{self.name}: error: {exc}", file=sys.stderr)
            return 2


def load_script(path: str | Path) -> ModuleType:
    """Import the Python file ``path`` (a recipe or a report script) as a module."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe script {path} not found")
    name = f"fedmerge_recipe_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe script {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def recipe_of(config: str | Path) -> Recipe | None:
    """The :class:`Recipe` a YAML config names with ``recipe:``, or None (not a recipe config)."""
    script = read_mapping(config).get(RECIPE_KEY)
    if script is None:
        return None
    recipe = getattr(load_script(Path(config).parent / str(script)), "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"{config}: recipe script {script} defines no RECIPE")
    return recipe
