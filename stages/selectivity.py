"""Stage selectivity: which features fire for one state / language only -> data/selectivity/<name>.npz.

Runs the replacement model (model + transcoders) on the organism world's labeled prompts
(``World.labeled_prompts()`` of ``selectivity.world``: every canonical two-hop prompt, both
languages) and counts, per label value (``selectivity.labels``) and position role
(``selectivity.roles``: the city's token, the last token, any token), on how many prompts each
feature fires (``pipeline.analysis.selectivity``). The table keeps the thresholds ``hi`` / ``lo``
that define a selective feature; the intervene stage's selection rules read it. Same inputs,
same bytes. The log gets the number of selective features per role, label and value.
"""

from __future__ import annotations

from pipeline.analysis.selectivity import compute_selectivity
from pipeline.run.compose import load_config
from stages._model import load_replacement_model
from stages._stage import load_world, parse_args, remove_stale_temps, selectivity_path, setup_torch


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    cfg = load_config(args.params)
    remove_stale_temps(selectivity_path(cfg.selectivity))
    setup_torch(cfg.runtime)
    spec = cfg.selectivity
    bank = load_world(spec.world).labeled_prompts()
    model = load_replacement_model(cfg)
    table = compute_selectivity(model, bank, labels=spec.labels, roles=spec.roles, hi=spec.hi, lo=spec.lo)
    out = table.save(selectivity_path(spec))
    print(f"selectivity: {out}  {len(bank)} prompts; selective features (hi {spec.hi}, lo {spec.lo}):")
    for role, labels in table.n_selective().items():
        for label, counts in labels.items():
            print(f"  {role:>5} {label}: " + ", ".join(f"{v} {n}" for v, n in counts.items()))


if __name__ == "__main__":
    main()
