"""ONNX export, int8 quantisation and ONNX Runtime prediction (``predict`` needs neither torch nor Lightning)."""
