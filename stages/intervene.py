"""Stage intervene@<prompt id>: check the pruned circuit causally -> results/<id>/report/.

Reads the pruned graph (results/<id>/pruned.npz, which carries the attribution's full row
of the target logit, so the graph store is not read) and the replacement model, and runs
``pipeline.analysis.evaluation.evaluate`` with the ``intervention`` config group and the prompt's own
experiments (``prompts.items.<id>.experiments``): top-k ablations against the attribution's
prediction, faithfulness of the circuit, and the named swap / ablate / steer experiments with
their baselines. Selection rules read the selectivity table (data/selectivity/<name>.npz);
donors named by id are prompts of the prompt set (labeled by their tags); same-state donors
come from the organism world's labeled prompts and the language of a continuation from its
words (``selectivity.world``).

Outputs:
  results/<id>/report/       report.json, report.md, metrics.json, figures/*.png
                             (deterministic bytes: sorted keys, fixed figure metadata)
  metrics/interventions/<id>.json
                             the report's summary (flip counts overall, per experiment kind
                             and group, each with its baselines; faithfulness; correlations)
                             for intervene_summary
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline._io import atomic_path, finite_or_none, write_json
from pipeline.analysis.evaluation import evaluate
from pipeline.analysis.evaluation_spec import EvaluationSpec, PromptContext
from pipeline.analysis.report import write_report
from pipeline.analysis.selectivity import SelectivityTable, labeled_prompt
from pipeline.graph.pruned import load_pruned_graph
from pipeline.run.compose import load_config
from pipeline.run.config import PipelineConfig
from stages._model import load_replacement_model
from stages._stage import load_world, parse_args, prompt_dir, remove_stale_temps, selectivity_path, setup_torch

#: Per-prompt summaries (one file per prompt id); intervene_summary reads this folder.
METRICS_DIR = Path("metrics") / "interventions"


def evaluation_spec(cfg: PipelineConfig, prompt_id: str) -> EvaluationSpec:
    """The library's spec from ``intervention`` + the prompt's experiments (errors name the prompt)."""
    iv = cfg.intervention
    item = cfg.prompts.items[prompt_id]
    try:
        return EvaluationSpec.from_dict(
            {**dataclasses.asdict(iv), "experiments": [dataclasses.asdict(e) for e in item.experiments]}
        )
    except ValueError as exc:
        raise ValueError(f"prompts.items.{prompt_id}.experiments: {exc}") from None


def prompt_context(cfg: PipelineConfig, prompt_id: str) -> PromptContext:
    """This prompt and the prompt set's as labeled prompts, the selectivity table, and the
    world's prompt bank and words' languages."""
    world = load_world(cfg.selectivity.world)
    prompts = {pid: labeled_prompt(p.prompt, p.tags, p.language) for pid, p in cfg.prompts.items.items()}
    return PromptContext(
        prompt=prompts[prompt_id],
        prompts=prompts,
        selectivity=SelectivityTable.load(selectivity_path(cfg.selectivity)),
        bank=world.labeled_prompts(),
        word_languages=world.word_languages(),
    )


def outputs(prompt_id: str) -> tuple[Path, ...]:
    """What this stage writes (dvc.yaml's outs)."""
    return prompt_dir(prompt_id) / "report", METRICS_DIR / f"{prompt_id}.json"


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(*outputs(args.prompt_id))
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    item = cfg.prompts.items[args.prompt_id]
    spec = evaluation_spec(cfg, args.prompt_id)  # before the model loads: a bad spec fails fast
    model = load_replacement_model(cfg)
    run = prompt_dir(args.prompt_id)
    pruned = load_pruned_graph(run / "pruned.npz")
    if pruned.target_feature_edges is None:
        raise ValueError(
            f"{run / 'pruned.npz'} has no target_feature_edges (written by an older prune): "
            f"rerun it with `dvc repro -f prune@{args.prompt_id}`"
        )
    report = evaluate(model, pruned, spec, prompt=item.prompt, context=prompt_context(cfg, args.prompt_id))
    with atomic_path(run / "report") as tmp:
        write_report(report, tmp, figure_formats=("png",))
    write_json(METRICS_DIR / f"{args.prompt_id}.json", finite_or_none(report["summary"]))
    s = report["summary"]
    rate = "-" if s["flip_rate"] is None else f"{s['flip_rate']:.2f}"
    baselines = "  ".join(f"{name} {b['n_flipped']}/{b['n_runs']}" for name, b in s["baselines"].items() if b["n_runs"])
    print(
        f"report: {run / 'report' / 'report.md'}  flipped {s['n_flipped']}/{s['n_checked']} ({rate})  "
        f"baselines: {baselines or '-'}  faithfulness {s['faithfulness']}  correlation (direct) {s['correlation_direct']}"
    )


if __name__ == "__main__":
    main()
