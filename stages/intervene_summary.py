"""Stage intervene_summary: the study's intervention metrics -> metrics/interventions.json.

Reads metrics/interventions/<id>.json (each prompt's report summary, written by
intervene@<id>) for every prompt of the prompt set and writes, as a DVC metric (``dvc metrics show``): the share of experiments
whose expected flip happened, overall, per experiment kind (``by_kind``: swap, ablate,
steer), per experiment group (``by_group``: state_swap, language_steer, ...) and per prompt
kind (``by_prompt_kind``: two_hop, one_hop, language, ...), each with its baselines' runs,
flips and flip rates, plus mean faithfulness and mean correlations of the top-k ablations
with the attribution.
"""

from __future__ import annotations

from pipeline._io import finite_or_none, read_json, write_json
from pipeline.analysis.evaluation import study_metrics
from pipeline.run.compose import load_config
from stages._stage import parse_args, remove_stale_temps
from stages.intervene import METRICS_DIR

OUT = METRICS_DIR.parent / "interventions.json"


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    remove_stale_temps(OUT)
    cfg = load_config(args.params)
    ids = list(cfg.prompts.items)
    missing = [pid for pid in ids if not (METRICS_DIR / f"{pid}.json").is_file()]
    if missing:
        raise SystemExit(f"no intervention metrics for {missing}: run intervene@<id> first (dvc repro)")
    summaries = [read_json(METRICS_DIR / f"{pid}.json") for pid in ids]
    kinds: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        kinds.setdefault(cfg.prompts.items[pid].kind or "unlabelled", []).append(i)
    metrics = study_metrics(summaries, prompt_groups=kinds)
    metrics["by_prompt_kind"] = metrics.pop("by_prompt_group")
    write_json(OUT, finite_or_none(metrics))
    by_kind = "  ".join(f"{k} {v['n_flipped']}/{v['n_checked']}" for k, v in metrics["by_kind"].items())
    baselines = "  ".join(
        f"{name} {b['n_flipped']}/{b['n_runs']}" for name, b in metrics["baselines"].items() if b["n_runs"]
    )
    print(
        f"interventions: {OUT}  flipped {metrics['n_flipped']}/{metrics['n_checked']}  {by_kind}  "
        f"baselines: {baselines or '-'}"
    )


if __name__ == "__main__":
    main()
