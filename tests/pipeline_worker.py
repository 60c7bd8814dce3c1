"""One rank for tests/test_pipeline_runtime.py: `planner.pipeline_demo` writing its
report to ``--json PATH`` (``PATH.rank<r>.json``)."""

import sys

from planner.pipeline_demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)   # the test reads the reports, failures included
