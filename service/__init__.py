"""rbstream service: decode alerts, score them with an ONNX real-bogus model, publish the scores."""

__version__ = "0.1.0"
