"""`python -m ops.soak`: see ops/soak/run.py."""

import sys

from ops.soak.run import main

sys.exit(main())
