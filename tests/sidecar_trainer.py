"""A toy external trainer for the sidecar tests (not fedmerge code: plain torch + safetensors).

``python tests/sidecar_trainer.py DIR NODE STEPS PAUSE``: pulls a node-specific quadratic's
weights toward its own target, one step at a time; resumes from the merge ``merged.json``
names whenever it is newer than the last one loaded; writes ``ckpt-<step>.safetensors``
after each step via a temporary file and a rename.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(folder: Path, node: int, steps: int, pause: float) -> None:
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(node))
    state = {
        "w": torch.zeros(4, 3),
        "b": torch.zeros(3),
        "count": torch.zeros((), dtype=torch.int64),
    }
    loaded = 0
    for step in range(1, steps + 1):
        pointer = folder / "merged.json"
        if pointer.exists():
            p = json.loads(pointer.read_text())
            if p["round"] > loaded:
                state, loaded = load_file(folder / p["file"]), p["round"]
        state["w"] = state["w"] - 0.2 * (state["w"] - target)
        state["b"] = state["b"] - 0.2 * (state["b"] - target[node % 4])
        state["count"] = state["count"] + 1
        tmp = folder / f".ckpt-{step}.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, folder / f"ckpt-{step}.safetensors")
        time.sleep(pause)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
