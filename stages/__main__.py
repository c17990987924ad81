"""``python -m stages NAME [ARGS]``: run the stage ``stages/NAME.py`` (what dvc.yaml's commands call).

The stage runs in a warm interpreter when one is serving this checkout (``stages/_warm.py``):
a fork of a process that has already imported torch, TransformerLens and the library, so a
stage costs its own work rather than seconds of imports. Same code, same outputs; with
``CIRCUIT_PIPELINE_WARM=0``, or where no server can run, it runs in this process.
``python -m stages.NAME`` still runs a stage directly.
"""

from __future__ import annotations

import sys

from stages._warm import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(sys.argv[1:]))
