"""Integration tests: real clients over real servers."""
