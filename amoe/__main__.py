import sys

from amoe.cli import main

sys.exit(main())
