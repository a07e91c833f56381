"""The Flower App of ``flwr run .`` (``[tool.flwr.app.components]`` in pyproject.toml).

The logic lives in :mod:`fedmerge.runtimes.flower_app`; this module only names the two
apps, so Ray unpickles the ClientApp by reference instead of re-sending it per message.
"""

from pathlib import Path

from fedmerge.runtimes.flower_app import client_app, run_config_server_app

server_app = run_config_server_app(Path(__file__).resolve().parent.parent)

__all__ = ["client_app", "server_app"]
