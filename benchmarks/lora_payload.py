"""LoRA agents: how much smaller are adapter payloads, and does factors vs product matter?

Builds a small ViT (offline, from a config; 8×8 digits as 16 patches of 2×2), pretrains it
briefly on 90°-rotated digits (a related task, so the base is not useless), saves it as a
Hugging Face model directory, then runs the same decentralized gossip on upright digits
(non-IID shards, ring of 8) three ways: full-weight agents, and LoRA agents (rank r on the
attention query/value projections + the classifier) merged with ``peft.lora_merge:
factors`` and ``product``. Prints the payload bytes of one message for full weights and
for the adapter, their ratio, and the final mean accuracy of each run.

    python benchmarks/lora_payload.py            # ~10 min on 2 busy CPU cores
    python benchmarks/lora_payload.py --rounds 10 --rank 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.config import load_config  # noqa: E402
from fedmerge.data.datasets import load_dataset  # noqa: E402
from fedmerge.decentralized.setup import build_setup  # noqa: E402
from fedmerge.hf.lora import build_hf  # noqa: E402
from fedmerge.runtimes import run  # noqa: E402

VIT = {"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
       "intermediate_size": 192, "patch_size": 2}  # fmt: skip


def pretrain(out: Path, steps: int, seed: int) -> None:
    """The ViT trained ``steps`` Adam steps on rotated digits, saved to ``out``."""
    ds = load_dataset("digits")
    x, y = torch.rot90(ds.x, 1, dims=(2, 3)), ds.y
    torch.manual_seed(seed)
    wrapper = build_hf(in_shape=tuple(x.shape[1:]), num_classes=10, config=VIT)
    opt = torch.optim.Adam(wrapper.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(wrapper(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    wrapper.model.save_pretrained(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--pretrain-steps", type=int, default=400)
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "vit"
        start = time.perf_counter()
        pretrain(base, args.pretrain_steps, seed=0)
        console.print(f"pretrained {base.name} on rotated digits in "
                      f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        common = ["model.name=hf", f"model.options.path={base}", "topology=ring-8",
                  f"rounds={args.rounds}", "train.optimizer=adam", "train.lr=0.003",
                  "train.steps=15"]  # fmt: skip
        runs = {"full weights": [],
                "LoRA factors": [f"peft.r={args.rank}", "peft.lora_merge=factors"],
                "LoRA product": [f"peft.r={args.rank}", "peft.lora_merge=product"]}  # fmt: skip
        table = Table(title=f"gossip on digits, ViT from {base.name}, ring of 8, "
                            f"{args.rounds} rounds")  # fmt: skip
        for col in ("agents share", "payload (bytes)", "global acc. (mean)", "time (s)"):
            table.add_column(col, justify="left" if col == "agents share" else "right")
        sizes = {}
        for name, extra in runs.items():
            cfg = load_config(None, [*common, *extra])
            sizes[name] = build_setup(cfg).agent(0).publish(1).nbytes
            start = time.perf_counter()
            rows, _ = run(cfg)
            last = [r["global_acc"] for r in rows if r["round"] == args.rounds]
            table.add_row(name, f"{sizes[name]:,}", f"{sum(last) / len(last):.3f}",
                          f"{time.perf_counter() - start:.1f}")  # fmt: skip
    console.print(table)
    ratio = sizes["full weights"] / sizes["LoRA product"]
    console.print(f"full-weight payload / LoRA payload (rank {args.rank}) = {ratio:.1f}×")


if __name__ == "__main__":
    main()
