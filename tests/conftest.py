"""Shared fixtures. The real S3 server (SeaweedFS) fixtures live in tests/s3server.py."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest_plugins = ["tests.s3server"]
