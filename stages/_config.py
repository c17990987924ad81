"""The pipeline's side of Hydra and OmegaConf: schema registration and params loading.

``register_configs()`` stores the schema of ``pipeline/run/config.py`` in Hydra's ConfigStore
as ``pipeline_schema``; ``conf/config.yaml`` lists it first in its defaults, so every
composition (``dvc exp run``, the tests, ``compose()`` below) merges the YAML choices onto
typed nodes: an unknown key or a value of the wrong type is a composition error naming
the key. DVC composes in its own process, which imports this module through the Hydra
plugin in ``stages/hydra_plugins/`` (``.dvc/config``: ``hydra.plugins_path = stages``).

``load_config(params.yaml)`` is what every stage calls first: the composed file merged onto
the same schema and turned into the dataclasses, so a stage never reads an unchecked value.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.run.config import PipelineConfig

SCHEMA_NAME = "pipeline_schema"
ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "conf"
CONFIG_NAME = "config"
PARAMS_FILE = "params.yaml"
#: where stages.split_params writes params.yaml split per prompt (what dvc.yaml's params name)
PARAMS_SPLIT_DIR = "data/params"


class ConfigError(ValueError):
    """The composed configuration does not fit the schema."""


def register_configs() -> None:
    """Store the pipeline schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=PipelineConfig)


def compose(overrides: Sequence[str] = (), config_dir: str | os.PathLike = CONFIG_DIR) -> str:
    """Compose ``conf/`` with Hydra ``overrides`` and return the YAML text of ``params.yaml``,
    exactly as DVC writes it (``dvc.utils.hydra.compose_and_dump``: resolved, ``to_yaml``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def load_config(path: str | os.PathLike = PARAMS_FILE) -> PipelineConfig:
    """Read a composed ``params.yaml`` into the schema; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: compose it with `dvc exp run` or `python -m stages.compose`")
    try:
        schema = OmegaConf.structured(PipelineConfig)
        merged = OmegaConf.merge(schema, OmegaConf.load(path))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    assert isinstance(cfg, PipelineConfig)
    return cfg


def parse_args(
    description: str | None, *, prompt: bool = False, argv: Sequence[str] | None = None, **extra: str
) -> argparse.Namespace:
    """Common stage arguments: ``--params`` (default params.yaml), ``--prompt-id`` for a
    per-prompt stage, plus ``extra`` required string options (name -> help)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=PARAMS_FILE, help="composed config (default: params.yaml)")
    if prompt:
        parser.add_argument("--prompt-id", required=True, help="key of the prompt in prompts.items")
    for name, help_text in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", required=True, help=help_text)
    return parser.parse_args(argv)
