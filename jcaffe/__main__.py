"""``python -m jcaffe`` runs the ``jcaffe`` command line (same as the console script)."""

import sys

from jcaffe.cli import main

sys.exit(main())
