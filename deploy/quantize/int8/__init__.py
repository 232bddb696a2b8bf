"""int8 weights with per-token or static activation scales: the Relax rewrite onto edge/kernels/int8.py, calibration, compile options and the accuracy report (docs/int8.md)."""
