"""Runtimes that run a :class:`~fedmerge.config.SimConfig`: each module ``<name>.py`` here
exposes ``run(cfg, *, on_round=None, **options) -> list[dict]`` returning the simulator's
metrics rows (one per agent per round), so every runtime writes the same report."""
