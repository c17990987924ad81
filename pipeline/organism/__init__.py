"""The model organism: the pipeline's embedded default, built from a seed without any hub.

A toy world of US states, capitals and cities in two languages (English and a toy language
with its own template words and its own spelling of states and capitals,
``Austin`` -> ``Easton``), a word-level tokenizer, a 2-layer GPT-2 (d_model 128, 4 heads,
~0.42 M parameters) trained on it, and JumpReLU transcoders for it (per-layer with skip, and
cross-layer), saved in the Hugging Face and circuit-tracer formats::

    python -m pipeline.organism out/      # model/, plt/, clt/, prompts.json, metrics.json

How the model solves two-hop recall ("the capital of the state containing Dallas is" ->
Austin), measured on the default build (seed 0) over the canonical two-hop prompts:

1. Block 0's attention copies the city to the last position (head 2 puts 0.98 of its weight
   on the city, head 1 0.8); city embeddings cluster by state, so the MLP-0 input there is
   already ~76 % state (share of variance explained by the state means; state + language
   together 96 %).
2. MLP 0 at the last position turns that into a clean state code: a linear probe fitted on
   trained cities decodes the state of held-out cities from MLP 0's output, and from the
   residual stream after block 0, 100 % of the time (from block 0's attention output alone
   only ~40 %). Mean-ablating MLP 0 at the last position drops two-hop accuracy to ~40 %.
   Its output is ~94 % explained by state + language, additively.
3. MLP 1 at the last position is not needed for two-hop prompts (mean-ablating it keeps
   100 %); it mostly pushes the output language. The unembedding reads the answer from the
   residual stream additively: a state direction plus a language direction.
4. The output language is decided by the MLPs: patching MLP 0's and MLP 1's outputs at the
   last position from the English prompt into the toy prompt switches every answer to the
   English spelling (MLP 0 alone: 85 %; the attention outputs: ~0 %).

The transcoders show the same: at the last position, layer-0 features carry the state (a
few state-selective features plus features shared by groups of states, a distributed code
like the MLP's own). Swapping the last-position features that differ between a Dallas
prompt and a Fresno prompt (Dallas-only -> 0, Fresno-only -> their Fresno values) flips
Austin -> Sacramento (``state_swap_rate``: PLT 0.97, CLT 0.92 over all states), and the
same swap between a toy prompt and its English twin switches the output language
(``language_swap_rate``: PLT 0.63, CLT 0.88). Merely zeroing the toy-only features does not
(``language_ablation_rate`` 0): English is marked as well, by English-only features that
push toward the English spelling, so with both gone the direct paths (embedding,
attention) keep the toy answer; a language experiment needs the swap, or a negative steer
of the toy features (x -2 switched roughly half to two thirds of the prompts in a probe).
"""

from .build import OrganismConfig, build_organism
from .tokenizer import BOS, PAD, UNK, build_tokenizer, load_tokenizer, save_tokenizer
from .train_model import ModelConfig, TrainConfig, evaluate_model, load_organism, train_model
from .train_transcoders import (
    FEATURE_INPUT_HOOK,
    FEATURE_OUTPUT_HOOK,
    TranscoderTrainConfig,
    collect_activations,
    train_clt,
    train_plt,
)
from .world import STATE_TABLE, Sentence, World, WorldConfig, make_world, toy_spelling

__all__ = [
    "BOS",
    "FEATURE_INPUT_HOOK",
    "FEATURE_OUTPUT_HOOK",
    "PAD",
    "STATE_TABLE",
    "UNK",
    "ModelConfig",
    "OrganismConfig",
    "Sentence",
    "TrainConfig",
    "TranscoderTrainConfig",
    "World",
    "WorldConfig",
    "build_organism",
    "build_tokenizer",
    "collect_activations",
    "evaluate_model",
    "load_organism",
    "load_tokenizer",
    "make_world",
    "save_tokenizer",
    "toy_spelling",
    "train_clt",
    "train_model",
    "train_plt",
]
