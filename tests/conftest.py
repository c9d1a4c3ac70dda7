"""Shared test configuration. Markers (host, netns, slow) are registered in pyproject.toml."""
