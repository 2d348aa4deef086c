"""cnnpipe: an experiment-tracking pipeline for image-classification CNNs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnnpipe")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+local"
