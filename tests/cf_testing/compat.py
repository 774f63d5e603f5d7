"""Standard-library modules the tests use that are newer than the oldest Python we support (3.10)."""

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (the dev extra installs it there)
    import tomli as tomllib

__all__ = ["tomllib"]
