"""streamtsm: streaming action recognition for live cameras."""

__version__ = "0.1.0"
