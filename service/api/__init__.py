"""The HTTP API: POST /classify, explanations, the scanning page, health, /model and /metrics."""
