"""
C{python -m curvetun}: the C{curvetun} command (see L{curvetun.cli}).
"""

from curvetun.cli import main

if __name__ == "__main__":
    main()
