"""Test package (makes test modules importable as tests.<pkg>.<module>, so tests/stomp never shadows stomp.py)."""
