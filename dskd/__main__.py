"""`python -m dskd ...` and `deepspeed --module dskd ...`."""

import sys

from dskd.cli import main

sys.exit(main())
