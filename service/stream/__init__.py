"""Stream: the Kafka consume loop that walks each batch through decode, score and publish."""
