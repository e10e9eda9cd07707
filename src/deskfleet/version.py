"""The package's version, in a module of its own so that every part can name it without
importing the public surface (``deskfleet/__init__.py`` re-exports it)."""

__version__ = "0.1.0"
