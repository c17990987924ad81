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

import json
from pathlib import Path

from omegaconf import OmegaConf

from stages._config import PARAMS_SPLIT_DIR, load_config, parse_args
from stages._io import atomic_path


def _json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    load_config(args.params)  # the schema check every stage would do
    raw = OmegaConf.to_container(OmegaConf.load(args.params), resolve=True)
    prompts = raw.get("prompts") or {}
    items = prompts.get("items") or {}
    global_part = {**raw, "prompts": {k: v for k, v in prompts.items() if k != "items"}}
    with atomic_path(PARAMS_SPLIT_DIR) as tmp:
        (tmp / "prompts").mkdir(parents=True)
        (tmp / "global.json").write_text(_json(global_part), encoding="utf-8")
        for pid, item in items.items():
            (tmp / "prompts" / f"{pid}.json").write_text(_json({"prompts": {"items": {pid: item}}}), encoding="utf-8")
    print(
        f"params: {Path(PARAMS_SPLIT_DIR) / 'global.json'} and {len(items)} prompt files in "
        f"{Path(PARAMS_SPLIT_DIR) / 'prompts'}"
    )


if __name__ == "__main__":
    main()
