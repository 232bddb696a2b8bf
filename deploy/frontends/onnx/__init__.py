"""The ONNX frontend: import exporter graphs (normalized shape arithmetic, custom converters) and lower pre-quantized models."""
