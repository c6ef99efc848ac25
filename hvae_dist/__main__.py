import sys

from hvae_dist.cli import main

sys.exit(main())
