"""Offline datasets, partitioners and task families (import from the submodules)."""
