"""`python -m tinker.cli` and the `tinker` console script (`tinker.cli.__main__:main`)."""

import sys

from . import cli


def main() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    main()
