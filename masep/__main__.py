"""`python -m masep ...` is the `masep` command."""
import sys

from .cli import main

sys.exit(main())
