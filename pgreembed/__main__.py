"""`python -m pgreembed` is the `pgreembed` command."""

import sys

from pgreembed.cli import main

sys.exit(main())
