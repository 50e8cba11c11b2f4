import sys

from felix_lite.cli import main

sys.exit(main())
