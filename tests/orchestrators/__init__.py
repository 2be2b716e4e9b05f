"""Tests that run the orchestrator recipes in the orchestrators themselves (own environments)."""
