"""`python -m proxy` runs the `token-proxy` command."""

import sys

from .cli import main

sys.exit(main())
