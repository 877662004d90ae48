import sys

from mmlora.cli import main

sys.exit(main())
