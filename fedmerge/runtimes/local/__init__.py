"""The in-process runtime: every agent in this process (per-agent and stacked engines)."""
