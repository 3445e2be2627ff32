"""chat-gateway: a STOMP-over-WebSocket/SockJS chat gateway.

Owns the package version (:data:`__version__`, from the installed distribution's metadata) and
:func:`resource_dir`, which finds the directories the gateway ships beside its code:

* ``alembic`` (the migration scripts) and ``static`` (the chat pages) live at the top of the
  repository. A wheel carries them as package data under ``gateway/_data/`` (pyproject.toml maps the
  top-level directories there), found through :mod:`importlib.resources`.
* From the source tree (an editable install, or ``python -m gateway.cli`` in a checkout) there is no
  ``gateway/_data``; the repository's own top-level directories are used instead.

Imports nothing from the rest of the gateway.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

DISTRIBUTION = "chat-gateway"

#: The directories :func:`resource_dir` knows.
RESOURCES = ("alembic", "static")

#: The checkout this package was imported from, if it was imported from one (None when installed).
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _version()


def source_root() -> Path | None:
    """The repository this package was imported from, or None for an installed (non-editable) package."""
    root = _SOURCE_ROOT
    if (root / "pyproject.toml").is_file() and (root / "gateway" / "__init__.py").is_file():
        return root
    return None


def resource_dir(name: str) -> Path:
    """The shipped directory ``name`` (``"alembic"`` or ``"static"``) as a filesystem path.

    The package data of an installed wheel comes first, then the repository's top-level directory.
    Raises FileNotFoundError when neither exists (e.g. a wheel built without its package data).
    """
    if name not in RESOURCES:
        raise ValueError(f"unknown resource directory {name!r} (one of {', '.join(RESOURCES)})")
    bundled = resources.files(__name__).joinpath("_data").joinpath(name)
    if isinstance(bundled, Path) and bundled.is_dir():
        return bundled
    root = source_root()
    if root is not None and (root / name).is_dir():
        return root / name
    raise FileNotFoundError(f"chat-gateway's {name}/ directory is missing: neither {bundled} (package data "
                            f"of an installed wheel) nor a source checkout's {name}/ exists")
