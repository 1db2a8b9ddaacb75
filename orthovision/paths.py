"""Where things are: the checkout, its shipped checkpoint and the shared data beside it.

Relative paths in a config (`serve.checkpoint`) resolve against the checkout, so a Ray
worker started in any directory finds the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = PROJECT_ROOT / "models" / "default"
SHARED_ROOT = PROJECT_ROOT.parent / "shared"  # real data and schemas, never committed
SHARED_DATA = SHARED_ROOT / "data"


def project_path(path: str | Path) -> Path:
    """`path` if absolute, else relative to the checkout."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path


def checkpoint_dir(configured: str | Path = DEFAULT_CHECKPOINT) -> Path:
    """$ORTHOVISION_CHECKPOINT, else `configured` (relative paths: the checkout's)."""
    return project_path(os.environ.get("ORTHOVISION_CHECKPOINT", configured))
