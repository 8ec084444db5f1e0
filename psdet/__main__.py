"""`python -m psdet ...` (what `torchrun -m psdet train ...` runs)."""
import sys

from psdet.cli import main

sys.exit(main())
