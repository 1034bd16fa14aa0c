import sys

from collabvit.cli import main

sys.exit(main())
