"""The package's version, in a module of its own: any part reads it without loading the rest."""

__version__ = "0.1.0"
