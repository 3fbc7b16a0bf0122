"""Calibration data sources and calibration reports for the offline build."""
