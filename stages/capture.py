"""Stage capture@<prompt id>: one clean forward pass seen through the transcoders.

Output results/<id>/capture.safetensors:
    tokens             (n_pos,) int64
    active_features    (n_active, 3) int32   (layer, pos, feature) of every active feature
    activation_values  (n_active,)           their activations (zero at BOS, so never listed)
    errors             (n_layers, n_pos, d_model)   true MLP output - transcoder reconstruction
    token_embeddings   (n_pos, d_model)
    last_logits        (d_vocab,)            next-token logits at the last position
metadata "info": JSON {"activations_shape": [n_layers, n_pos, d_transcoder]}. Activations are
stored sparse: a real model's dense activations would be tens of MB per prompt.
"""

from __future__ import annotations

import json

from safetensors.torch import save_file

from pipeline._io import atomic_path
from pipeline.run.compose import load_config
from stages._model import load_replacement_model, read_tokens
from stages._stage import parse_args, prompt_dir, remove_stale_temps, setup_torch


def main(argv=None) -> None:
    args = parse_args(__doc__, prompt=True, argv=argv)
    remove_stale_temps(prompt_dir(args.prompt_id) / "capture.safetensors")
    cfg = load_config(args.params)
    setup_torch(cfg.runtime)
    model = load_replacement_model(cfg, lazy_encoder=True)  # one forward
    run = prompt_dir(args.prompt_id)
    cap = model.capture(read_tokens(run / "tokens.safetensors"))
    idx, values = cap.active_features()
    tensors = {
        "tokens": cap.tokens,
        "active_features": idx.int(),
        "activation_values": values,
        "errors": cap.errors,
        "token_embeddings": cap.token_embeddings,
        "last_logits": cap.logits[-1],
    }
    out = run / "capture.safetensors"
    with atomic_path(out) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"info": json.dumps({"activations_shape": list(cap.activations.shape)})},
        )
    print(f"capture: {out}  active features {len(values)}")


if __name__ == "__main__":
    main()
