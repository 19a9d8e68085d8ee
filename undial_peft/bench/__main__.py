"""``python -m undial_peft.bench``: the same as ``undial-peft bench``."""

import sys

from . import main

sys.exit(main())
