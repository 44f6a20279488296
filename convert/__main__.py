"""`python -m convert SRC OUT`: see `convert.cli`."""

import sys

from .cli import main

sys.exit(main())
