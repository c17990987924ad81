"""Stage tokenize@<prompt id>: the prompt's token ids -> results/<id>/tokens.safetensors.

Every later stage of the prompt reads these ids instead of the text, so the whole prompt
chain sees one tokenization (BOS prepended as the replacement model does), and an edit of the
prompt that leaves its tokens unchanged reruns nothing downstream.
"""

from __future__ import annotations

import json

from safetensors.torch import save_file

from pipeline._io import atomic_path
from pipeline.engine.tokens import PromptTokenizer
from pipeline.run.compose import load_config
from stages._stage import parse_args, prompt_dir, remove_stale_temps


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(prompt_dir(args.prompt_id) / "tokens.safetensors")
    cfg = load_config(args.params)
    prompt = cfg.prompts.items[args.prompt_id]
    tokenizer = PromptTokenizer(cfg.model.name, revision=cfg.model.revision)  # no weights, no transcoders
    tokens = tokenizer.tokenize(prompt.prompt, allow_unknown_tokens=cfg.attribution.allow_unknown_tokens)
    tokens = tokens.cpu().contiguous()
    strings = tokenizer.convert_ids_to_tokens(tokens.tolist())
    out = prompt_dir(args.prompt_id) / "tokens.safetensors"
    with atomic_path(out) as tmp:
        # one metadata entry: safetensors writes several in no fixed order
        info = json.dumps({"prompt": prompt.prompt, "token_strings": strings}, sort_keys=True, ensure_ascii=False)
        save_file({"tokens": tokens}, str(tmp), metadata={"info": info})
    print(f"tokens: {out}  {strings}")


if __name__ == "__main__":
    main()
