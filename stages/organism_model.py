"""Stage organism_model: train the organism's GPT-2 on the world's corpus.

Outputs: models/organism/model (Hugging Face directory, loadable by the TransformerLens bridge)
and metrics/organism/model.json (accuracies, for ``dvc metrics show``). No output holds a wall
time (same params -> byte-identical outputs); the training time is printed to the log.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline._io import atomic_path, finite_or_none, read_json, write_json
from pipeline.devices import arithmetic_in_force
from pipeline.organism.config import TrainConfig
from pipeline.organism.train_model import train_model
from pipeline.run.compose import load_config
from stages._stage import load_world, parse_args, remove_stale_temps, scalars, setup_torch, shown

WORLD = Path("data/organism/world.json")
OUT = Path("models/organism/model")
METRICS = Path("metrics/organism/model.json")
SHOWN = ("one_hop_accuracy", "two_hop_trained_accuracy", "two_hop_heldout_accuracy")
#: run-dependent entries (the library returns its wall time but no longer saves it); dropped from
#: any saved metrics all the same, so outputs stay byte-stable
VOLATILE = ("wall_time_s", "total_wall_time_s")


def strip_volatile(path: Path) -> dict:
    """Drop run-dependent entries from a metrics.json the library wrote; return the rest."""
    metrics = read_json(path)
    for key in VOLATILE:
        metrics.pop(key, None)
    write_json(path, finite_or_none(metrics))
    return metrics


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    remove_stale_temps(OUT, METRICS)
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    spec = cfg.organism
    with atomic_path(OUT) as tmp:
        result = train_model(
            load_world(WORLD),
            spec.model,
            TrainConfig(**asdict(spec.train), threads=cfg.runtime.threads),
            out_dir=tmp,
            progress=False,
        )
        metrics = strip_volatile(tmp / "metrics.json")
    write_json(METRICS, finite_or_none(scalars(metrics)))
    a = arithmetic_in_force()
    print(
        f"organism model: {OUT}  {shown(metrics, SHOWN)}  (trained in {result['wall_time_s']:.1f} s, "
        f"{a['mode']} arithmetic, torch kernels {a['kernels']}, {a['cpu']})"
    )


if __name__ == "__main__":
    main()
