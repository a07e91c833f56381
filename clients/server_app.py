"""The ServerApp of ``flwr run .`` (``[tool.flwr.app.components]`` in pyproject.toml).

It relays the run configured by the run config (:mod:`fedmerge.runtimes.flower`) and
writes the report (config.yaml, metrics.jsonl, summary.json, plots) to its ``out-dir``.
"""

from pathlib import Path

from fedmerge.report import write_run
from fedmerge.runtimes.flower.server_app import run_config_server_app

app = run_config_server_app(Path(__file__).resolve().parent.parent, write_run)
