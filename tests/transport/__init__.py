"""Tests of gateway.transport."""
