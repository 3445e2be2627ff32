"""Ant-style destination patterns, as Spring's simple broker matches them.

Owns: deciding whether a destination matches a pattern. ``*`` matches within one path segment,
``**`` matches zero or more whole segments, ``?`` one character, ``{name}`` one whole segment.
Patterns are compiled once to a regular expression.

Must not import anything outside the standard library.
"""

from __future__ import annotations

import re
from functools import lru_cache

WILDCARDS = ("*", "?", "{")
"""The characters that make a destination an Ant pattern (``**`` is two ``*``)."""


def is_pattern(destination: str) -> bool:
    """True when ``destination`` contains Ant wildcards (``*``, ``?``) or ``{var}`` segments."""
    return any(ch in destination for ch in WILDCARDS)


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile an Ant pattern with ``/`` as the separator into an anchored regular expression."""
    segments = pattern.split("/")
    out: list[str] = []
    for index, segment in enumerate(segments):
        sep = "/" if index else ""
        if segment == "**":
            # zero or more whole segments, including their separators
            out.append("(?:/[^/]*)*" if index else "(?:[^/]*(?:/[^/]*)*)?")
            continue
        piece = []
        i = 0
        while i < len(segment):
            ch = segment[i]
            if ch == "*":
                piece.append("[^/]*")
            elif ch == "?":
                piece.append("[^/]")
            elif ch == "{":
                end = segment.find("}", i)
                if end < 0:
                    piece.append(re.escape(segment[i:]))
                    break
                piece.append("[^/]+")
                i = end
            else:
                piece.append(re.escape(ch))
            i += 1
        out.append(sep + "".join(piece))
    regex = "".join(out)
    if regex.startswith("(?:/[^/]*)*"):
        regex = "(?:/?[^/]*)*" + regex[len("(?:/[^/]*)*"):]
    return re.compile(regex + r"\Z")


def matches(pattern: str, destination: str) -> bool:
    """Whether ``destination`` matches the Ant ``pattern`` (an exact string matches only itself)."""
    if not is_pattern(pattern):
        return pattern == destination
    return compile_pattern(pattern).match(destination) is not None
