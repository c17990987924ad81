"""``python -m pipeline.organism OUT_DIR``: build the organism with default configs, print metrics."""

from __future__ import annotations

import argparse

from .build import OrganismConfig, build_organism
from .config import ORGANISM_SEED

_SUMMARY = {
    "model": [
        "one_hop_accuracy",
        "two_hop_trained_accuracy",
        "two_hop_heldout_accuracy",
        "language_accuracy_en",
        "language_accuracy_toy",
        "final_loss",
        "wall_time_s",
    ],
    "plt": [
        "fve",
        "l0_total",
        "dead_share",
        "agreement_answer_positions",
        "agreement_all_positions",
        "kl_all_positions",
        "state_swap_rate",
        "language_swap_rate",
        "language_ablation_rate",
        "wall_time_s",
    ],
}
_SUMMARY["clt"] = _SUMMARY["plt"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.organism", description=__doc__)
    ap.add_argument("out_dir", nargs="?", default="organism")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for every stage (default 2)")
    ap.add_argument(
        "--seed",
        type=int,
        default=ORGANISM_SEED,
        help=f"seed of world split, model and transcoders (default {ORGANISM_SEED})",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    cfg = OrganismConfig(threads=args.threads).with_seed(args.seed)
    m = build_organism(args.out_dir, cfg, progress=not args.quiet)
    for stage, keys in _SUMMARY.items():
        print(f"[{stage}]")
        for k in keys:
            v = m[stage].get(k)
            print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    print(f"total wall time: {m['total_wall_time_s']:.1f} s  -> {args.out_dir}")


if __name__ == "__main__":
    main()
