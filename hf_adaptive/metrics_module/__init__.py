"""Path of the local `evaluate` module for continual metrics: `evaluate.load(CONTINUAL_METRICS_PATH)`."""

from pathlib import Path

CONTINUAL_METRICS_PATH = str(Path(__file__).with_name("continual_metrics.py"))

__all__ = ["CONTINUAL_METRICS_PATH"]
