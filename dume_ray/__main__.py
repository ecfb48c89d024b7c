"""`python -m dume_ray ...`: see dume_ray/cli.py."""

import sys

from dume_ray.cli import main

sys.exit(main())
