"""``python -m undial_peft.bench``: the same as ``undial-peft bench``."""

import sys

from undial_peft.bench import main

sys.exit(main())
