"""What the tests of the intervention report, its spec and its experiments share: a tiny model,
a prompt, its attribution graph and a donor prompt, and a spec with one experiment of each kind on them."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import testing
from pipeline.engine.attribution import attribute
from pipeline.engine.replacement import ReplacementModel


def tiny_setup(tiny_gpt2_dir: Path, plt_dir: Path, store: Path):
    """A float64 model, a prompt, its attribution graph (written to ``store``) and a donor prompt."""
    model = ReplacementModel.from_pretrained(tiny_gpt2_dir, plt_dir, dtype=torch.float64)
    words = testing.vocabulary_words(tiny_gpt2_dir)
    prompt = " ".join(words[3:9])
    donor = " ".join(words[10:14])
    graph = attribute(prompt, model, store=store, verbose=False)
    return model, prompt, donor, graph


def spec_for(model, prompt, donor, **kw) -> dict:
    cap = model.capture(prompt)
    idx, _ = cap.active_features()
    dcap = model.capture(donor)
    didx, _ = dcap.active_features()
    return {
        "top_k": 6,
        "max_new_tokens": 3,
        "supernodes": {"A": [idx[0].tolist(), idx[1].tolist()], "B": [didx[-1].tolist(), didx[-2].tolist()]},
        "experiments": [
            {"name": "ablate A", "kind": "ablate", "source": ["A"]},
            {
                "name": "swap A to B",
                "kind": "swap",
                "source": ["A"],
                "target": ["B"],
                "donor_prompt": donor,
                "source_factor": -1.0,
                "target_factor": 4.0,
            },
            {
                "name": "steer",
                "kind": "steer",
                "source": [idx[2].tolist()],
                "value": 25.0,
                "mode": "direct",
                "open_ended": True,
            },
        ],
        **kw,
    }
