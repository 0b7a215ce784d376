"""`python -m pdiff <command>`: the same as the `pdiff` console script."""

import sys

from pdiff.commands import main

sys.exit(main())
