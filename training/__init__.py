"""rbstream training: simulate or load stamp triplets, train the rotation-invariant CNN, export ONNX."""
