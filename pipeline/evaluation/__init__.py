"""Scoring predictions: metrics, calibration and test-time-augmentation views."""
