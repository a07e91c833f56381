"""The docs/peft.md quickstarts, run command by command as written (in-process CLI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import peft  # noqa: E402
import transformers  # noqa: E402

from fedmerge.cli import main as cli  # noqa: E402
from fedmerge.hf import tiny  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "peft.md"

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def quickstart(title: str) -> list[str]:
    """The lines of the first ```bash block under ``## Quickstart: {title}``."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"## Quickstart: {title}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def run(lines: list[str], cwd: Path, monkeypatch) -> Path:
    """Run ``python -m fedmerge.hf.tiny``, ``cd`` and ``fedmerge`` lines; returns the last cwd."""
    monkeypatch.chdir(cwd)
    for line in lines:
        argv = shlex.split(line)
        if argv[:3] == ["python", "-m", "fedmerge.hf.tiny"]:
            tiny.main(argv[3:])
        elif argv[0] == "cd":
            cwd = cwd / argv[1]
            monkeypatch.chdir(cwd)
        elif argv[0] == "fedmerge":
            assert cli(argv[1:]) == 0, line
        else:
            raise AssertionError(f"the test cannot run {line!r}")
    return cwd


@pytest.mark.parametrize(
    ("title", "model_dir", "adapter_dir"),
    [("merge LoRA adapters", "merged", "merged_lora"),
     ("fold arriving adapters", "folded", "folded_lora")],
)  # fmt: skip
def test_quickstart_runs_as_written(
    title, model_dir, adapter_dir, tmp_path, monkeypatch, one_thread
):
    demo = run(quickstart(title), tmp_path, monkeypatch)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo / model_dir)
    base = tiny.load_base(demo / "base")
    assert sorted(model.state_dict()) == sorted(base.state_dict())
    lora = peft.PeftModel.from_pretrained(base, demo / adapter_dir)
    assert lora.peft_config["default"].r == 8
