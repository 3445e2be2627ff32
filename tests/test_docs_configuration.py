"""docs/configuration.md lists every setting exactly as the code defines it."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import settings_table

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_table_matches_the_settings() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    table = text[text.index(begin) + len(begin): text.index(end)]
    assert table == settings_table(), "regenerate with: chat-gateway settings --markdown"
