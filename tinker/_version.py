"""The distribution's version: the Tinker SDK API level this package implements (0.38.0) plus the
local label `+local`. One source for both `tinker.__version__` and the package metadata
(pyproject.toml reads it), so they cannot disagree.

Why this form: pip treats `0.38.0+local` as satisfying `tinker>=0.38` (and every older lower
bound, such as the cookbook's `tinker>=0.23`), so installing a package that requires tinker keeps
this engine instead of fetching the official SDK over it. The local label marks it as not the
official release, and a PyPI index never serves versions with local labels.
"""

__title__ = "tinker"
__version__ = "0.38.0+local"
