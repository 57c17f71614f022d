import sys

from shoal.bench import main

sys.exit(main(sys.argv[1:], prog="python -m benchmarks"))
