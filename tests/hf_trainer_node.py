"""One node of the TrainerCallback test: a tiny offline GPT-2 trained by a ``transformers``
``Trainer`` on node-specific random tokens, with :class:`SidecarCallback` every 2 steps.

``python tests/hf_trainer_node.py DIR NODE STEPS``; prints the merge rounds it loaded (JSON).
"""

import json
import sys
import time

import torch
from transformers import GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from fedmerge.hf.callback import SidecarCallback
from fedmerge.hf.tiny import tiny_config


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.1)  # a step that takes a while, so rounds and steps interleave


def main(folder: str, node: int, steps: int) -> None:
    torch.manual_seed(0)  # one shared init
    model = GPT2LMHeadModel(tiny_config("gpt2"))
    gen = torch.Generator().manual_seed(100 + node)
    ids = torch.randint(0, 64, (64, 16), generator=gen)
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=f"{folder}/hf", max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=node,
    )  # fmt: skip
    callback = SidecarCallback(folder, every=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, Slow()]).train()
    print(json.dumps(callback.loaded), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
