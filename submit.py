#!/usr/bin/env python
"""The kit's command line: `python submit.py --help`."""
import sys

from guie_cli.main import main

if __name__ == "__main__":
    sys.exit(main())
