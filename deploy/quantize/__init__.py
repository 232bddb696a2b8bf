"""Quantization schemes, one subpackage each, with their calibration and accuracy checks."""
