"""The version of tl_powersteer (read by the build and written into saved files)."""

__version__ = "0.1.0"
