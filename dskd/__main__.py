"""`python -m dskd ...` and `deepspeed --module dskd ...`."""

import sys

from dskd import preemption

preemption.exit_on_interrupt()  # before dskd.cli's imports: a Ctrl-C while the command starts is one line
from dskd.cli import main  # noqa: E402 - after the Ctrl-C handler

sys.exit(main())
