"""Calibration metrics (being written)."""
