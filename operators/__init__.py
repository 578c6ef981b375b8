"""The midfill Kubernetes operator (kopf). Imports `midfill` only: never `trainer` or `serving`."""
