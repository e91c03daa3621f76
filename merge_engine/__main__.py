import sys

from merge_engine.cli import main

sys.exit(main())
