"""Compare `semiseg eval --json` reports side by side: mIoU and per-class IoU.

    python bench/compare_runs.py runs/a/eval.json runs/b/eval.json [--out compare.json]

A thin wrapper around `semiseg compare` (semiseg_cli/compare.py), kept for the bench scripts:
the same table, and `--out` writes the same JSON as `semiseg compare --json`, replacing the
file if it exists (the bench scripts rerun into the same result file). Its "runs" list is what
this script has always written, one {"label": "METHOD (RUN FOLDER)", **report} per input, which
bench/seed_summary.py reads. Prefer `semiseg compare` (labels, --split, run folders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from semiseg_cli.compare import run_compare
from semiseg_cli.errors import UserError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="eval reports or run folders; the first is the baseline")
    ap.add_argument("--out", type=Path, help="also write the comparison as JSON")
    args = ap.parse_args()
    try:
        run_compare(args.reports, json_out=args.out, overwrite=True, console=Console())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
