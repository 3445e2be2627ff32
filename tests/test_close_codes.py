"""Each WebSocket close code has one name, defined in gateway.close_codes; nobody else defines one."""

from __future__ import annotations

import ast
import pathlib

import gateway
from gateway import close_codes
from gateway.transport import base

CODES = {name: value for name, value in vars(close_codes).items() if name.startswith("CLOSE_")}


def test_the_codes_are_distinct_and_sendable() -> None:
    assert len(set(CODES.values())) == len(CODES)
    assert all(close_codes.sendable(code) for code in CODES.values())
    assert not any(close_codes.sendable(code) for code in (999, 1004, 1005, 1006, 1015, 2010, 5000))


def test_the_transport_contract_re_exports_the_same_objects() -> None:
    for name, value in CODES.items():
        assert getattr(base, name) == value, name


def test_no_other_module_assigns_a_websocket_close_code() -> None:
    """``CLOSE_X = <a code>`` or ``CLOSE_X = (<a code>, "reason")`` outside close_codes.py is a second
    definition; SockJS's own codes (3000, 2010) are not WebSocket codes and may stay in its protocol."""
    root = pathlib.Path(gateway.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path.name == "close_codes.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Constant | ast.Tuple):
                continue
            value = node.value.elts[0] if isinstance(node.value, ast.Tuple) and node.value.elts else node.value
            if isinstance(value, ast.Constant) and value.value in CODES.values():
                names = [t.id for t in node.targets if isinstance(t, ast.Name) and "CLOSE" in t.id]
                if names:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {names}")
    assert found == []
