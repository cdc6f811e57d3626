"""``python -m s2vec_pipeline.cli``: the ``s2vec`` command."""

import sys

from s2vec_pipeline.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
