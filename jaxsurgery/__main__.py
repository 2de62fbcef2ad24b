"""``python -m jaxsurgery``: apply a saved plan to a directory of orbax checkpoints (see docs/integrations.md)."""

import sys

from jaxsurgery._src.cli import main

if __name__ == "__main__":
  sys.exit(main())
