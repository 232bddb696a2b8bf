"""Model frontends: read a model file into a Relax module and its weights (one subpackage per input format)."""
