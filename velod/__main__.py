"""``python -m velod`` runs the daemon."""

import sys

from velod.daemon import main

sys.exit(main())
