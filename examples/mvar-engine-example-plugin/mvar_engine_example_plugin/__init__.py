"""An example third-party plugin for mvar-engine (see ``plugin.py``)."""

__version__ = "0.1.0"
