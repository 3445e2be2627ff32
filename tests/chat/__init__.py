"""Tests of gateway.chat: storage (repository, group commit, migrations) on SQLite and PostgreSQL."""
