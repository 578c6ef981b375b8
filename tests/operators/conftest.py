"""Fixtures of the operator tests (the emulated cluster, MLflow on SQLite, the running operator)."""

from tests.operators.emulator import cluster, operator, tracking_uri  # noqa: F401
from tests.operators.serve_endpoint import serve_endpoint  # noqa: F401
