"""`python -m mrs_adapter.prepare check|overlap ...` -> exit code: the data-preparation commands.

    python -m mrs_adapter.prepare check --dataset rsitmd --data-root data
    python -m mrs_adapter.prepare overlap --datasets rsitmd rsicd ucm --data-root data --csv o.csv
"""
import sys
from typing import List, Optional

from . import check, overlap


def main(argv: Optional[List[str]] = None) -> int:
    """argv -> exit code: `check` or `overlap` run; an error the user can act on is one line.

    - check: every problem of one dataset (check.py);
    - overlap: copies between datasets (overlap.py);
    - an error the user can act on: one line on stderr, exit code 1.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["overlap"]:
            return overlap.main(argv[1:])
        return check.main(argv)
    except (OSError, ValueError) as e:  # OSError: also a dataset not found, a file not ours
        print(f"error: {e}", file=sys.stderr)
        return 1
