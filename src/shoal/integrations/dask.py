"""Dask graphs and collections on Shoal (placeholder: being written)."""

from __future__ import annotations

import dask  # noqa: F401  (ImportError here means: dask not installed)


def set_default(client):
    return None


def unset_default(client, token) -> None:
    return None
