"""Decoder model definitions, one folder per architecture (relax.frontend.nn model + the mapping of
checkpoint weights onto it), and the registry that picks one by architecture name."""
