"""`python -m dskd.tracking replay OUTPUT_DIR [--uri URI]`: upload what dskd buffered while the tracking server
was unreachable. Exit 0 when nothing is left buffered, 1 when something still is (named on stderr)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dskd.tracking.buffer import BUFFER_DIR, OutageBuffer
from dskd.tracking.replay import replay_buffers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dskd.tracking", description=(
        "Upload MLflow records that dskd buffered while the tracking server was unreachable."))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="send <output_dir>/.mlflow-buffer/ to the tracking server(s) it names")
    p.add_argument("output_dir", type=Path, help="the recipe's run.output_dir")
    p.add_argument("--uri", help="only buffers for this tracking URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    replay_buffers(args.output_dir, args.uri, verbose=True)
    left = OutageBuffer(args.output_dir / BUFFER_DIR)
    remaining = left.runs() if left.root.is_dir() else []
    if remaining:
        print(f"still buffered: {', '.join(str(left.path(r)) for r in remaining)}", file=sys.stderr)
        return 1
    print("nothing left to upload")
    return 0
