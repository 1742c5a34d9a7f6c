import sys

from dkproxy.cli import main

sys.exit(main())
