"""The model organism: the pipeline's embedded default, built from a seed without any hub.

A toy world of states, capitals and cities in two languages (``world``), a word-level tokenizer
(``tokenizer``), a small GPT-2 trained on it (``train_model``) and JumpReLU transcoders for it
(``train_transcoders``: per-layer with skip, and cross-layer), saved in the Hugging Face and
circuit-tracer formats by ``build``; ``config`` holds the training settings. How the model
solves one- and two-hop recall, measured: ``docs/organism.md``. ::

    python -m pipeline.organism out/      # model/, plt/, clt/, prompts.json, metrics.json

The package imports nothing on its own: the config schema reads ``config`` and ``world``
without loading torch or transformers.
"""
