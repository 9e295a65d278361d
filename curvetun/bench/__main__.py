"""
C{python -m curvetun.bench}: the same as C{curvetun bench}.
"""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
