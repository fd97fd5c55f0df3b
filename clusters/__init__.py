"""Launchers for Ray clusters that rayflow runs on (a local multi-region one for development and tests)."""
