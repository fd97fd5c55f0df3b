"""Agents that run inside a sandbox (standard library only), named by a subtask spec as ``module:function``."""
