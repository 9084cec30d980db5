"""Publish: scores -> Avro score records and annotated alerts for the output topic."""
