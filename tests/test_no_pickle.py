"""Never pickle: an AST scan of the package (and the Flower / torchrun entry points) fails on
any way of unpickling bytes: ``pickle``/``cPickle``/``dill``/``marshal`` imports,
``torch.load`` without ``weights_only=True``, ``np.load(..., allow_pickle=True)``,
``marshal.loads``."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("fedmerge", "clients", "benchmarks") for p in (ROOT / d).rglob("*.py"))
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, name: str):
    """The keyword's value if it is a constant, ``...`` if given but not constant, else None."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
    return None


def violations(source: str, where: str = "<src>") -> list[str]:
    """Every unpickling construct in ``source``, as ``where:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]  # fmt: skip
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in BANNED_MODULES:
                found.append(f"{line}: from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{line}: from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                found.append(f"{line}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (
                None, False,
            ):  # fmt: skip
                found.append(f"{line}: np.load with allow_pickle")
            elif name == "marshal.loads":
                found.append(f"{line}: marshal.loads")
    return found


def test_package_never_unpickles():
    assert len(SOURCES) > 30  # the scan really sees the package
    bad = [v for p in SOURCES for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert not bad, "unpickling constructs found:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "src",
    [
        "import pickle",
        "import dill as d",
        "from cPickle import loads",
        "from marshal import loads",
        "import torch\ntorch.load(f)",
        "import torch\ntorch.load(f, weights_only=False)",
        "import torch\ntorch.load(f, weights_only=flag)",
        "from torch import load",
        "import numpy as np\nnp.load(f, allow_pickle=True)",
        "import numpy\nnumpy.load(f, allow_pickle=x)",
        "import marshal\nmarshal.loads(b)",
    ],
)
def test_scanner_catches(src):
    assert violations(src)


@pytest.mark.parametrize(
    "src",
    [
        "import torch\ntorch.load(f, weights_only=True)",
        "import numpy as np\nnp.load(f)",
        "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import json\njson.loads(s)",
        "from safetensors.torch import load\nload(b)",
    ],
)
def test_scanner_allows(src):
    assert violations(src) == []
