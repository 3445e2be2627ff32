"""``chat-gateway serve --help`` prints every setting's flag (help texts are free to contain ``%``)."""

from __future__ import annotations

from dataclasses import fields

from gateway.settings import Settings, flag_name
from tests.support.gateway_process import run_cli


def test_serve_help_lists_every_setting() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    for f in fields(Settings):
        assert flag_name(f.name) in result.stdout
