"""Build the whole organism into one directory: model, PLT, CLT, prompt set, metrics.

Layout of ``out_dir``::

    model/        config.json, model.safetensors, tokenizer files, metrics.json, organism.json
    plt/          config.yaml, layer_{l}.safetensors, metrics.json   (transcoder_set, skip)
    clt/          config.yaml, W_enc_{l}/W_dec_{l}.safetensors, metrics.json
    prompts.json  the default prompt set
    metrics.json  every stage's metrics and wall times
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ._util import write_json
from .config import ModelConfig, TrainConfig, TranscoderTrainConfig
from .train_model import train_model
from .train_transcoders import train_clt, train_plt
from .world import WorldConfig, make_world


@dataclass
class OrganismConfig:
    """Every setting of the organism build. ``threads`` overrides each stage's thread count."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plt: TranscoderTrainConfig = field(default_factory=TranscoderTrainConfig)
    clt: TranscoderTrainConfig = field(default_factory=lambda: TranscoderTrainConfig(skip=False))
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None:
            self.train.threads = self.plt.threads = self.clt.threads = self.threads

    def with_seed(self, seed: int) -> OrganismConfig:
        """This configuration with every part that draws (world split, model, both transcoder
        sets) seeded by ``seed``."""
        return replace(
            self,
            world=replace(self.world, seed=seed),
            train=replace(self.train, seed=seed),
            plt=replace(self.plt, seed=seed),
            clt=replace(self.clt, seed=seed),
        )


def write_prompts(path: str | Path, world) -> None:
    Path(path).write_text(json.dumps(world.prompt_set(), indent=2) + "\n")


def build_organism(out_dir: str | Path, cfg: OrganismConfig | None = None, progress: bool = True) -> dict:
    """Train the model and both transcoder sets into ``out_dir``; return all metrics."""
    cfg = cfg or OrganismConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = make_world(cfg.world)
    write_prompts(out / "prompts.json", world)
    metrics: dict[str, Any] = {"model": train_model(world, cfg.model, cfg.train, out / "model", progress=progress)}
    metrics["plt"] = train_plt(out / "model", world, cfg.plt, out / "plt", progress=progress)
    metrics["clt"] = train_clt(out / "model", world, cfg.clt, out / "clt", progress=progress)
    metrics["total_wall_time_s"] = time.perf_counter() - t0
    metrics["config"] = asdict(cfg)
    write_json(out / "metrics.json", metrics)
    return metrics
