import sys

from .cli import main

if __name__ == "__main__":      # guarded: hashing workers re-import __main__ when spawned
    sys.exit(main())
