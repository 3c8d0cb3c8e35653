"""The HTTP listener: REST API, health, readiness and Prometheus metrics."""
