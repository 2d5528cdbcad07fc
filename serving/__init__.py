"""Serving stage: engines (ONNX Runtime, TensorRT), dynamic batcher and the gRPC server.

Imports ``retrieval`` but never ``training`` or torch, so the serving image stays small.
"""
