"""Make the repository importable (`prismatic`) and this folder's helpers (`craft_toy_models`) for the CRaFT tests."""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
for p in (REPO_ROOT, Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
