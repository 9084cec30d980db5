"""Score: stamps -> real/bogus scores with an ONNX model (the model folder, its card, the runtime)."""
