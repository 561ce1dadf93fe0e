"""The report's one error type."""
from __future__ import annotations


class ReportError(Exception):
    """Nothing to report, or MLflow cannot be read: a one-paragraph message for the user."""
