"""Starting clusters: ``LocalCluster`` and process helpers."""

from .local import LocalCluster

__all__ = ["LocalCluster"]
