"""
C{python -m rtunnel ...}: the same as the C{rtunnel} admin command.
"""

import sys

from rtunnel.cli.admin import main

if __name__ == "__main__":
    sys.exit(main())
