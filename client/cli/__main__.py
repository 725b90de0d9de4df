"""`python -m cosserve.cli`: the `cosserve` command."""

import sys

from cosserve.cli import main

sys.exit(main())
