"""make demo: Label Studio, Redis, the backend and its workers on loopback with a demo project."""
