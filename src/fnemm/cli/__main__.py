import sys

from fnemm.cli import main

sys.exit(main())
