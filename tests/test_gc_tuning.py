"""gc_gen0_threshold: ``chat-gateway serve`` freezes start-up objects and spaces young collections."""

from __future__ import annotations

import subprocess
import sys

PROBE = ("import gc, sys; from gateway.app import tune_gc; tune_gc(int(sys.argv[1])); "
         "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)")


def probe(threshold: int) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout.strip()


def test_the_threshold_is_applied_and_start_up_objects_frozen() -> None:
    assert probe(12345) == "12345 True"


def test_zero_keeps_pythons_defaults() -> None:
    assert probe(0) == "700 False"
