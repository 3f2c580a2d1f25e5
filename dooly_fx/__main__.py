import sys

from dooly_fx.cli import main

sys.exit(main())
