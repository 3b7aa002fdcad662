"""The single `panal` command: composes each package's CLI group."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("panal")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
