"""Hydra and OmegaConf, in one place: the schema's registration, composing ``conf/``, and
reading a composed ``params.yaml`` back into the schema's dataclasses.

``register_configs()`` stores the schema of :mod:`pipeline.run.config` in Hydra's ConfigStore:
``conf/config.yaml`` lists ``pipeline_schema`` first in its defaults and ``conf/study.yaml``
adds ``study_schema``, so every composition (``dvc exp run``, a study, the tests) merges the
YAML choices onto typed nodes, and an unknown key or a value of the wrong type fails, naming
the key. DVC composes in its own process, which registers the schema through the Hydra
plugin in ``stages/hydra_plugins/`` (``.dvc/config``: ``hydra.plugins_path = stages``).

``load_config(params.yaml)`` is what every stage calls first; ``compose_study(overrides)`` is
what ``circuit-pipeline study`` does with its ``key=value`` words, which are the overrides of
``dvc exp run -S`` plus the ``launcher`` group and ``out``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline.run.config import PipelineConfig, StudyConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A configuration that does not fit the schema."""


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent): ``pipeline_schema``, first in
    conf/config.yaml's defaults, and ``study_schema``, which conf/study.yaml merges after it."""
    store = ConfigStore.instance()
    store.store(name="pipeline_schema", node=PipelineConfig)
    store.store(name="study_schema", node=_study_schema())


def _study_schema() -> DictConfig:
    """:class:`StudyConfig` with its :class:`PipelineConfig` fields MISSING. Merged onto the
    composed pipeline config, it adds ``launcher`` and ``out`` and types the whole as a
    study; a MISSING value leaves the composed one in place, where a default would replace it."""
    node = OmegaConf.structured(StudyConfig)
    for f in dataclasses.fields(PipelineConfig):
        node[f.name] = MISSING
    return node


def load_config(path: str | os.PathLike = PARAMS_FILE) -> PipelineConfig:
    """Read a composed ``params.yaml`` into the schema; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: compose it with `dvc exp run`")
    try:
        return _to_schema(PipelineConfig, OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    """A composed ``params.yaml`` as plain data (interpolations resolved), after the schema
    check of :func:`load_config`: the keys and values DVC's ``params:`` name."""
    load_config(path)
    params = OmegaConf.to_container(OmegaConf.load(Path(path)), resolve=True)
    assert isinstance(params, dict)  # load_config read it as the schema's mapping
    return params


def compose_study(
    overrides: Sequence[str] = (), config_dir: str | os.PathLike = CONFIG_DIR
) -> tuple[StudyConfig, dict[str, str]]:
    """``conf/study.yaml`` composed with Hydra ``overrides`` (``prompts=capitals``,
    ``model=gemma-2-2b``, ``launcher.jobs=4``, ...) into a :class:`StudyConfig`, and the
    group choices Hydra made (``{"prompts": "capitals", "launcher": "local", ...}``).
    A bad override is a :class:`ConfigError` of one line naming the key or the choice."""
    register_configs()
    try:
        with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
            cfg = compose(config_name="study", overrides=list(overrides), return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]
        return _to_schema(StudyConfig, OmegaConf.to_container(cfg)), choices
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc


def _to_schema(schema: type, cfg):
    """``cfg`` merged onto ``schema`` (which refuses keys it lacks, such as Hydra's ``+key=``
    additions) and turned into its dataclasses, whose ``__post_init__`` checks run."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


def _one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's messages span lines (search paths, node types): the missing
    choice with the available ones, else the key and the first line of the deepest cause."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, choice = exc.missing_cfg_file.partition("/")
        return f"conf/{group} has no {choice!r} (choices: {', '.join(exc.options or ())})"
    causes = list(_causes(exc))
    for cause in reversed(causes):
        key = getattr(cause, "full_key", None)
        if key:
            return f"{key}: {_first_line(cause)}"
    return ": ".join(_first_line(cause) for cause in causes[:2])


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
