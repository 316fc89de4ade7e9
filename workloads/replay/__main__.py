"""`python -m workloads.replay`: the command line of workloads/replay/cli.py."""

import sys

from workloads.replay.cli import main

if __name__ == "__main__":
    sys.exit(main())
