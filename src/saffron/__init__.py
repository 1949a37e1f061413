"""saffron: inference-time safety by tree search guided by a multifurcation reward model (Saffron-1)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("saffron")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
