"""`python -m dskd.tracking replay OUTPUT_DIR`: see `dskd.tracking.cli`."""

import sys

from dskd.tracking.cli import main

sys.exit(main())
