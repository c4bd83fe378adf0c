"""What a command prints for other programs to read."""

from __future__ import annotations

import json
import sys
from typing import Any


def print_json(value: Any) -> None:
    """One indented JSON document on stdout (dates and paths as strings)."""
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
