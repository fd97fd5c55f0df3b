"""Sandboxes: isolated environments (Docker, Linux namespaces, plain process) for a worker or one subtask."""
