"""C{python -m twistvpn}: the same as the C{twistvpn} command."""

import sys

from twistvpn.cli import main

sys.exit(main())
