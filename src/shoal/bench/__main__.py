import sys

from . import main

sys.exit(main(sys.argv[1:], prog="python -m shoal.bench"))
