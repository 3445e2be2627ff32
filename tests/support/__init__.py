"""Helpers shared by test packages (real services: PostgreSQL, ...)."""
