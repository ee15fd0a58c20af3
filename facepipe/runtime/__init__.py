"""Reduced-precision CPU runtimes (bf16 on OpenVINO, calibrated int8 on onnxruntime) behind the backend seams."""
