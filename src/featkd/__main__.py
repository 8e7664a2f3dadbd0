import sys

from featkd.cli import main

sys.exit(main())
