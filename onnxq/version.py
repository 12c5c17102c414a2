"""The package version: a leaf module, so any module (and setup.cfg) can read it without importing the API."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
