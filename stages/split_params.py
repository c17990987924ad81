"""Stage split_params: params.yaml split into the small files the other stages list their
params from -> data/params/.

  data/params/global.json           every section except the prompts' items
  data/params/prompts/<id>.json     {"prompts": {"items": {<id>: the prompt}}}, one per prompt

Same keys and values as params.yaml (as every stage reads it: ``load_config``), so a stage's
``params:`` in dvc.yaml names the keys it reads exactly as before, from one of these files.
Why: DVC parses a stage's params file in full, for every stage, on every ``dvc repro`` and
``dvc status``. With params.yaml that is every prompt's items for every stage of every prompt:
a no-op ``dvc repro`` grew with prompts squared (20 organism prompts with their experiments,
1563 lines: 10.2 s). Here each stage reads its own prompt's file and the global one.

This stage depends on the whole of params.yaml and runs first; rewriting the files leaves the
unchanged ones with the same contents, so DVC reruns only the stages whose keys changed.
params.yaml is validated against the schema first: a bad value fails here, naming the key.
"""

from __future__ import annotations

from pathlib import Path

from pipeline._io import atomic_path, json_text
from pipeline.run.compose import load_params
from stages._stage import parse_args, remove_stale_temps

OUT = Path("data/params")


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    remove_stale_temps(OUT)
    raw = load_params(args.params)  # checked against the schema as every stage would
    prompts = raw.get("prompts") or {}
    items = prompts.get("items") or {}
    global_part = {**raw, "prompts": {k: v for k, v in prompts.items() if k != "items"}}
    with atomic_path(OUT) as tmp:
        (tmp / "prompts").mkdir(parents=True)
        (tmp / "global.json").write_text(json_text(global_part, indent=1), encoding="utf-8")
        for pid, item in items.items():
            text = json_text({"prompts": {"items": {pid: item}}}, indent=1)
            (tmp / "prompts" / f"{pid}.json").write_text(text, encoding="utf-8")
    print(f"params: {OUT / 'global.json'} and {len(items)} prompt files in {OUT / 'prompts'}")


if __name__ == "__main__":
    main()
