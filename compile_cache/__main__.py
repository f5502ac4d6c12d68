"""``python -m compile_cache``: the cache CLI (see compile_cache.cli)."""

import sys

from .cli import main

sys.exit(main())
