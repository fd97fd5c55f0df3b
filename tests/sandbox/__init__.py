"""Tests that attack sandboxes of every isolating backend and check the attack is contained."""
