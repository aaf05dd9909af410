"""``python -m iscse.download``: fetch wiki1m and SentEval's data (``--help`` lists the flags); the code lives in
:mod:`iscse.training.download`."""
from __future__ import annotations

import sys

if __name__ == "__main__":
    from iscse.training.download import main as _main

    sys.exit(_main())
