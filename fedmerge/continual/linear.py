"""Which tensors OPCM projects: the weights of Linear layers.

From a live module the answer is exact (every ``nn.Linear``'s ``weight``). A bare
checkpoint has only names and shapes, so the default rule is: a 2-D floating
tensor whose name does not look like an embedding table. The pattern
:data:`EMBEDDING_PATTERN` (case-insensitive, searched anywhere in the name) is

    ``embed|wte|wpe|lm_head|tok_|position``

which covers ``embed_tokens``, ``word_embeddings``, GPT-2's ``wte``/``wpe``,
``tok_embeddings``, ``position_embedding`` and tied output heads. Two regexes
(also searched, case-insensitive) override it: ``project`` replaces the rule
(exactly the 2-D floating keys it matches are projected) and ``no_project``
removes the keys it matches from whichever set the rule gave.

>>> import torch
>>> specs = {"embed.weight": torch.zeros(5, 3), "fc.weight": torch.zeros(2, 3),
...          "fc.bias": torch.zeros(2), "ln.weight": torch.zeros(3)}
>>> sorted(default_projectable(specs))
['fc.weight']
>>> sorted(default_projectable(specs, project="embed|fc"))
['embed.weight', 'fc.weight']
>>> sorted(default_projectable(specs, no_project="fc"))
[]
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from fedmerge.checkpoint import TensorSpec
from fedmerge.errors import ConfigError

EMBEDDING_PATTERN = r"embed|wte|wpe|lm_head|tok_|position"


def linear_keys_from_module(module: nn.Module) -> set[str]:
    """State-dict keys of the ``weight`` of every ``nn.Linear`` inside ``module``."""
    return {
        f"{name}.weight" if name else "weight"
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear)
    }


def _compile(pattern: str | None, field: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"{field}: invalid regular expression {pattern!r} ({exc})") from None


def default_projectable(
    specs: Mapping[str, TensorSpec | torch.Tensor],
    project: str | None = None,
    no_project: str | None = None,
) -> set[str]:
    """Keys of 2-D floating tensors that are not embeddings (see the module docstring).

    ``specs`` maps key -> :class:`TensorSpec` (or a tensor). ``project`` replaces
    the embedding rule by "matches ``project``"; ``no_project`` removes matches.
    """
    embed = re.compile(EMBEDDING_PATTERN, re.IGNORECASE)
    force_in, force_out = _compile(project, "--project"), _compile(no_project, "--no-project")
    keys = set()
    for key, spec in specs.items():
        if len(spec.shape) != 2 or not spec.dtype.is_floating_point:
            continue
        if force_out is not None and force_out.search(key):
            continue
        wanted = force_in.search(key) if force_in is not None else not embed.search(key)
        if wanted:
            keys.add(key)
    return keys
