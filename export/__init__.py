"""Export stage: checkpoint -> ONNX -> FP16 ONNX -> TensorRT engine, each step checked for parity."""
