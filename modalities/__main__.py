"""``python -m modalities <command>``: the same as the ``msar`` console script."""
from .cli import main

raise SystemExit(main())
