"""Data: the competition contract, the embedded demo, the decoded-image cache and datasets."""
from .contract import Competition, DataError, check, load_competition

__all__ = ["Competition", "DataError", "check", "load_competition"]
