"""`python -m pgreembed` is the `pgreembed` command."""

import sys

from pgreembed.cli.main import main

sys.exit(main())
