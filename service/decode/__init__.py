"""Decode: Kafka message bytes -> alerts (Avro framing, writer schemas, cutouts) -> per-survey stamps."""
