"""The model organism: the pipeline's embedded default, built from a seed without any hub.

A toy world of US states, capitals and cities in two languages (English and a toy language
with its own template words and its own spelling of states and capitals,
``Austin`` -> ``Easton``), a word-level tokenizer, a 2-layer GPT-2 (d_model 128, 4 heads,
~0.42 M parameters) trained on it, and JumpReLU transcoders for it (per-layer with skip, and
cross-layer), saved in the Hugging Face and circuit-tracer formats::

    python -m pipeline.organism out/      # model/, plt/, clt/, prompts.json, metrics.json

How the model solves two-hop recall ("the capital of the state containing Dallas is" ->
Austin), as measured on the default build:

1. Block 0's attention copies the city to the last position (one head attends to the city
   with weight ~1); city embeddings cluster by state, so the MLP input there is already
   ~75 % state (variance explained by the state's mean).
2. MLP 0 at the last position turns it into a state/answer code: mean-ablating MLP 0 there
   drops two-hop accuracy to ~8 %; its output is ~93 % explained by state + language
   (additively), and a linear probe decodes the state after block 0 on held-out cities
   (100 %).
3. MLP 1 at the last position is not needed for two-hop prompts (mean-ablating it keeps
   100 %); it mostly sharpens the output language. The unembedding reads the capital from
   the residual stream additively: a state direction plus a language direction.
4. The output language is decided by the MLPs: patching MLP 0's output at the last position
   from the English prompt into the toy prompt switches the answer to English (100 %).

The transcoders show the same: at the last position, layer-0 features carry the state (a
few state-selective features plus features shared by groups of states); swapping the features
that differ between a Dallas prompt and a Fresno prompt flips Austin -> Sacramento
(``state_swap_rate`` in the transcoder metrics), and swapping the toy-only features for the
English-only ones switches the output language (``language_swap_rate``). Merely zeroing the
toy-only features does not (``language_ablation_rate`` ~0): the toy signal is spread over
features shared by both languages, so that experiment needs a swap or a negative steer.
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
