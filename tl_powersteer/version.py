"""Versions: this package's (read by the build and written into saved files), the
installed versions of the packages it runs on, and what to do about a known-broken one."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

__all__ = ["KV_CACHE_FIX", "__version__", "installed_version", "versions_line"]

__version__ = "0.1.0"

# transformers 5.24.0 breaks TransformerBridge.generate with its KV cache (TL 4.3).
KV_CACHE_FIX = (
    "install the verified versions (pip install 'transformers<5.24'; in a checkout, "
    "scripts/test.sh installs requirements/*.txt), or generate with use_cache=False"
)


def installed_version(name: str) -> str | None:
    """The installed version of a distribution (``"transformers"``), or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions_line(names: Sequence[str]) -> str:
    """``"transformers 5.23.0, transformer-lens 4.3.0"``, for messages."""
    return ", ".join(f"{name} {installed_version(name) or 'not installed'}" for name in names)
