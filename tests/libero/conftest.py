"""Make the repository importable for the LIBERO evaluation tests (helpers live in libero_fakes.py)."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
