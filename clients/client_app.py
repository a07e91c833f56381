"""The ClientApp of ``flwr run .`` (``[tool.flwr.app.components]`` in pyproject.toml): one
fedmerge agent per SuperNode (:mod:`fedmerge.runtimes.flower.client_app`)."""

from fedmerge.runtimes.flower.client_app import app

__all__ = ["app"]
