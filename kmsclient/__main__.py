import sys

from kmsclient.cli import main

sys.exit(main())
