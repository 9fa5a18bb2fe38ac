"""HTTP status API, the IT page and Prometheus metrics, served inside the node process (node/api/server.py)."""
