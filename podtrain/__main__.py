"""`python -m podtrain ...` is the `podtrain` command."""

import sys

from podtrain.launch.cli import main

sys.exit(main())
