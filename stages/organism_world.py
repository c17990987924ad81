"""Stage organism_world: the toy world's facts, split and prompt set -> data/organism/world.json.

The training stages rebuild the world from the ``config`` recorded here, so they depend on
this file rather than on the ``organism.world`` params.
"""

from __future__ import annotations

from pathlib import Path

from pipeline._io import write_json
from pipeline.organism.world import SENTENCE_KINDS, make_world
from pipeline.run.compose import load_config
from stages._stage import parse_args, remove_stale_temps

OUT = Path("data/organism/world.json")


def main(argv=None) -> None:
    args = parse_args(__doc__, argv=argv)
    remove_stale_temps(OUT)
    cfg = load_config(args.params)
    world = make_world(cfg.organism.world)
    write_json(
        OUT,
        {
            "config": world.config.to_dict(),
            "languages": list(world.languages),
            "states": [
                {
                    "name": s.name,
                    "capital": s.capital,
                    "cities": list(s.cities),
                    "held_out": list(world.held_out.get(s.name, ())),
                }
                for s in world.states
            ],
            "vocabulary": world.vocabulary(),
            "n_training_sentences": {k: len(world.sentences(k, split="train")) for k in SENTENCE_KINDS},
            "prompt_set": world.prompt_set(),
        },
    )
    print(f"world: {OUT}")


if __name__ == "__main__":
    main()
