"""Offline experiments that reproduce the papers' claims (each runnable with ``python -m``)."""
