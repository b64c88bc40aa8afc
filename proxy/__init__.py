"""token-proxy: a reverse proxy that checks the JSON Web Token of every request."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("token-proxy")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
