"""Stage organism_transcoders@{plt,clt}: JumpReLU transcoders for the organism's MLPs.

Outputs: models/organism/<kind> (circuit-tracer on-disk format) and metrics/organism/<kind>.json
(FVE, L0, dead-feature share, next-token agreement of the replacement model). No wall time in
either (byte-identical reruns); the training time is printed to the log.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline._io import atomic_path, finite_or_none, write_json
from pipeline.organism.config import TranscoderTrainConfig
from pipeline.organism.train_transcoders import train_clt, train_plt
from pipeline.run.compose import load_config
from stages._stage import load_world, parse_args, remove_stale_temps, scalars, setup_torch, shown
from stages.organism_model import OUT as MODEL_DIR
from stages.organism_model import WORLD, strip_volatile

TRAIN = {"plt": train_plt, "clt": train_clt}
SHOWN = ("fve", "l0_total", "dead_share", "agreement_answer_positions")


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv, kind="plt or clt")
    remove_stale_temps(Path("models/organism") / args.kind, Path("metrics/organism") / f"{args.kind}.json")
    if args.kind not in TRAIN:
        raise SystemExit(f"--kind must be one of {sorted(TRAIN)}, got {args.kind!r}")
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    spec = getattr(cfg.organism, args.kind)
    out = Path("models/organism") / args.kind
    with atomic_path(out) as tmp:
        result = TRAIN[args.kind](
            MODEL_DIR,
            load_world(WORLD),
            TranscoderTrainConfig(**asdict(spec), threads=cfg.runtime.threads),
            out_dir=tmp,
            progress=False,
        )
        metrics = strip_volatile(tmp / "metrics.json")
    write_json(Path("metrics/organism") / f"{args.kind}.json", finite_or_none(scalars(metrics, drop=("d_transcoder",))))
    print(f"organism {args.kind}: {out}  {shown(metrics, SHOWN)}  (trained in {result['wall_time_s']:.1f} s)")


if __name__ == "__main__":
    main()
