"""Calibration: one pass of hooks over calibration text, keeping per-probe statistics."""
from .collect import calibrate, model_fingerprint
from .stats import ProbeStats, Stats

__all__ = ["calibrate", "Stats", "ProbeStats", "model_fingerprint"]
