"""Sandboxes: one isolated environment per worker (Docker, Linux namespaces, plain process)."""
