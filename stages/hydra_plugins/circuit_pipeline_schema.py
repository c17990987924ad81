"""Registers the pipeline's config schema when Hydra scans for plugins.

DVC composes ``conf/`` in its own process (``dvc exp run``), after importing every module of
the ``hydra_plugins`` namespace package found under ``hydra.plugins_path`` (``stages``, see
``.dvc/config``). Importing this module stores the schema in the ConfigStore
(``pipeline.run.compose.register_configs``), so DVC's composition validates against the same
dataclasses as the stages. It defines no plugin.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the dvc executable's sys.path does not hold the repository root
    sys.path.append(_ROOT)

from pipeline.run.compose import register_configs  # noqa: E402

register_configs()
