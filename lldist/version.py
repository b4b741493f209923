"""lldist's version: a leaf module, so that the store can record it without importing the package face."""

__version__ = "0.3.0"
