"""The organism's training settings: plain dataclasses (no torch), so the pipeline's config schema
can use them as its ``organism.*`` nodes without importing the training code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

#: the seed of the default organism (world split, model, transcoders); docs/organism.md gives the
#: other seeds' numbers beside it
ORGANISM_SEED = 1

#: the residual dimension that ``ModelConfig.massive_activation`` holds (written by block 0's MLP)
MASSIVE_ACTIVATION_DIM = 0


# ModelConfig, TrainSettings: the nodes organism.model and organism.train of the pipeline's
# config schema, hence typing's Optional and Tuple (the forms OmegaConf 2.3 documents) and a
# plain str for loss_on (OmegaConf has no Literal).
@dataclass
class ModelConfig:
    """GPT-2 architecture. d_mlp None -> 4 * d_model; n_ctx must hold the longest sentence + BOS.

    attention_free_blocks: blocks whose attention writes nothing (output projection zero and
    frozen in training), so they compute per position. Block 0 attention-free makes the model
    look up a city's state at the city's own position, where block 1's attention reads it:
    two-hop recall then goes through a state representation of its own (docs/organism.md).
    """

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: Optional[int] = None
    n_ctx: int = 16
    activation: str = "gelu_new"
    tie_embeddings: bool = True
    attention_free_blocks: Tuple[int, ...] = (0,)
    #: a constant written into residual dimension MASSIVE_ACTIVATION_DIM by block 0's MLP at every
    #: position (that dimension of its output bias, held there through training), as the early MLPs
    #: of large language models write a few huge activations: the later LayerNorms then divide by a
    #: nearly constant scale, so that amplifying a feature changes what the residual holds rather
    #: than how much of the rest the normalisation lets through. 0: none (the default)
    massive_activation: float = 0.0

    def __post_init__(self) -> None:
        self.attention_free_blocks = tuple(int(b) for b in self.attention_free_blocks)
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if self.n_layers < 1 or self.n_ctx < 2:
            raise ValueError("n_layers >= 1 and n_ctx >= 2 required")
        if any(not 0 <= b < self.n_layers for b in self.attention_free_blocks):
            raise ValueError(f"attention_free_blocks must be blocks of 0..{self.n_layers - 1}")


@dataclass
class TrainSettings:
    """Optimization. The learning rate warms up linearly for ``warmup_steps`` then follows a
    cosine from ``lr`` down to ``lr * min_lr_ratio`` at ``steps``. ``loss_on``: ``all`` or
    ``answer`` (the module docstring).

    Curriculum: the first ``curriculum_fraction`` of the steps samples sentence kinds with
    ``curriculum_kind_weights`` (city_state, state_capital, two_hop, city_adjacent) instead of
    the world's weights: the one-hop facts that two-hop recall composes come first."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 40
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    loss_on: str = "all"
    seed: int = ORGANISM_SEED
    curriculum_fraction: float = 0.5
    curriculum_kind_weights: Tuple[float, ...] = (0.0, 1.0, 0.0, 1.0)
    #: an L2 penalty on the MLP outputs of ``mlp_out_l2_blocks``: weight x the mean over real
    #: tokens of ||MLP output||^2 / d_model, added to the loss. 0: none (the default)
    mlp_out_l2: float = 0.0
    mlp_out_l2_blocks: Tuple[int, ...] = (0,)
    #: Gaussian noise of this standard deviation (per coordinate) added in training to the
    #: residual stream entering ``residual_noise_block``, at every position: the later blocks
    #: must read what they need from it robustly. 0: none (the default)
    residual_noise: float = 0.0
    residual_noise_block: int = 1
    #: a penalty on how much block 0's MLP output differs between the cities of one state: weight
    #: x the share of its variance over the batch's city tokens that lies within states (scale-free:
    #: it falls only as the state explains more of that output), added to the loss. 0: none (the default)
    state_spread: float = 0.0
    #: a penalty on how far the states' mean block-0 MLP outputs at their cities are from a regular
    #: simplex (every pair of states equally far apart): weight x the mean over pairs of states of
    #: (cosine + 1/(k-1))^2, added to the loss. 0: none (the default)
    state_simplex: float = 0.0
    #: an L1 penalty on block 0's MLP activations (after the nonlinearity): weight x the mean over
    #: real tokens of their mean absolute value, added to the loss, so that few of its neurons
    #: fire on a token. 0: none (the default)
    mlp_hidden_l1: float = 0.0
    #: in training, at each city token with probability ``city_common_boost_p``, block 0's MLP
    #: output's component along the batch's mean city output (the part every city shares) is
    #: multiplied by a factor drawn uniformly from [1, this]: the model learns that how much of the
    #: shared part a city carries says nothing about its state, so that amplifying a generic city
    #: feature does not read as some state. 0: none (the default); else > 1
    city_common_boost: float = 0.0
    city_common_boost_p: float = 0.5
    #: in training, at each city token with probability ``city_noise_p``, a random direction
    #: orthogonal to the states' mean residuals there (the batch's, centered: the subspace that
    #: tells the states apart) is added to the residual stream entering block 1, with a norm drawn
    #: uniformly from [0, this x that residual's own norm]: the later block learns to read the state
    #: from that subspace alone, so that an amplified feature moves the answer by the state it
    #: carries, not by the size of the rest. 0: none (the default)
    city_noise: float = 0.0
    city_noise_p: float = 0.5

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.curriculum_kind_weights = tuple(float(w) for w in self.curriculum_kind_weights)
        self.mlp_out_l2_blocks = tuple(int(b) for b in self.mlp_out_l2_blocks)
        if self.residual_noise < 0:
            raise ValueError(f"residual_noise must be >= 0, got {self.residual_noise}")
        if self.city_common_boost != 0 and self.city_common_boost <= 1:
            raise ValueError(f"city_common_boost must be 0 (off) or > 1, got {self.city_common_boost}")
        if not 0 < self.city_common_boost_p <= 1:
            raise ValueError(f"city_common_boost_p must be in (0, 1], got {self.city_common_boost_p}")
        if self.city_noise < 0 or not 0 < self.city_noise_p <= 1:
            raise ValueError(
                f"city_noise must be >= 0 and city_noise_p in (0, 1], got {self.city_noise}, {self.city_noise_p}"
            )
        if self.mlp_hidden_l1 < 0:
            raise ValueError(f"mlp_hidden_l1 must be >= 0, got {self.mlp_hidden_l1}")
        if self.state_simplex < 0:
            raise ValueError(f"state_simplex must be >= 0, got {self.state_simplex}")
        if self.state_spread < 0:
            raise ValueError(f"state_spread must be >= 0, got {self.state_spread}")
        if self.mlp_out_l2 < 0:
            raise ValueError(f"mlp_out_l2 must be >= 0, got {self.mlp_out_l2}")
        if not 0.0 <= self.curriculum_fraction < 1.0:
            raise ValueError(f"curriculum_fraction must be in [0, 1), got {self.curriculum_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.loss_on not in ("all", "answer"):
            raise ValueError(f"loss_on must be 'all' or 'answer', got {self.loss_on!r}")


@dataclass
class TrainConfig(TrainSettings):
    """The settings and the torch threads of the run (a choice of the machine, not of the
    experiment: the pipeline takes it from ``runtime.threads``)."""

    threads: int = 2


#: the transcoders' training tokens (TranscoderTrainSettings.contexts)
CONTEXTS: Tuple[str, ...] = ("sentence", "prefix")


# The pipeline's config schema uses TranscoderTrainSettings as its organism.plt / organism.clt
# nodes, hence typing's Optional (the form OmegaConf 2.3 documents) and a plain str for
# skip_init (OmegaConf has no Literal).
@dataclass
class TranscoderTrainSettings:
    """Transcoder training (standardized units: x and y scaled so that E||x||^2 = d_model)."""

    #: features per layer
    d_transcoder: int = 512
    #: optimization: AdamW, linear warmup then cosine decay to lr * min_lr_ratio
    steps: int = 2000
    batch_size: int = 512
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    #: lambda of the tanh sparsity penalty (per layer, per token) and c inside the tanh. At
    #: c = 10 the penalty saturates within a few activation units, close to counting active
    #: features: features then specialize (one for a state) where at 1 (close to an L1
    #: penalty) they share a dense code across states
    sparsity_coefficient: float = 0.012
    tanh_scale: float = 10.0
    #: eps of the threshold's straight-through estimator, and the initial threshold theta
    bandwidth: float = 0.1
    threshold_init: float = 0.1
    #: share of the steps over which lambda ramps up from 0
    sparsity_warmup: float = 0.5
    #: learn a linear skip W_skip (PLT only; the CLT is trained without one), initialised at
    #: "zero" or by "least_squares" (the affine fit of y on x), with an L2 penalty that keeps
    #: the state in the features
    skip: bool = True
    skip_init: str = "zero"
    skip_l2: float = 0.01
    #: a skip of at most this rank (W_skip = U V, trained as the two factors; saved as the
    #: product, so the on-disk format is the same). Room for a few directions common to many
    #: tokens (the part of MLP 0's output every city shares), none for 12 states. None: full rank
    skip_rank: Optional[int] = None
    #: the training tokens: every non-BOS position of every distinct sentence ("sentence": a
    #: prefix k sentences share counts k times, as in a corpus) or each distinct prefix once
    #: ("prefix"); and a cap on their number (None: all, some 11 thousand)
    contexts: str = "sentence"
    n_tokens: Optional[int] = None
    #: Matryoshka training: feature-count prefixes (e.g. [16, 64]) whose features alone must
    #: also reconstruct the MLP output; the loss averages the reconstruction over them and the
    #: whole dictionary. Meant against feature absorption: a city feature whose decoder also
    #: writes its state, so that any of them transplants the state. None: plain training
    matryoshka: Optional[List[int]] = None
    #: a penalty on the overlap of features that fire together: weight x, per layer, the mean over
    #: the batch's tokens of the summed squared cosine between the decoders of every two features
    #: firing on the token, added to the loss, so that a feature firing beside a state's feature
    #: does not also write part of that state. 0: none (the default)
    coactive_orthogonality: float = 0.0
    #: a penalty on the state that features other than state features write at the city: weight
    #: x the mean over layer-0 features of w_f x the share of f's layer-0 decoder (squared) in the
    #: span of the states' mean MLP outputs at their cities (centered), where w_f is the share of
    #: f's firings that are at cities times how little f tells one state from the others (1 minus
    #: the gap between the shares of the two states' cities it fires on most, refreshed every 50
    #: steps), so that a generic, group or single-city feature written larger moves no state.
    #: 0: none; the default 1.0 (docs/organism.md#the-transcoders)
    state_tint: float = 1.0
    seed: int = ORGANISM_SEED

    def __post_init__(self) -> None:
        if self.d_transcoder < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("d_transcoder, steps and batch_size must be >= 1")
        if self.coactive_orthogonality < 0:
            raise ValueError(f"coactive_orthogonality must be >= 0, got {self.coactive_orthogonality}")
        if self.state_tint < 0:
            raise ValueError(f"state_tint must be >= 0, got {self.state_tint}")
        if self.bandwidth <= 0 or self.threshold_init <= 0:
            raise ValueError("bandwidth and threshold_init must be > 0")
        if self.skip_rank is not None and self.skip_rank < 1:
            raise ValueError(f"skip_rank must be a positive rank or None (a full-rank skip), got {self.skip_rank!r}")
        if self.contexts not in CONTEXTS:
            raise ValueError(f"contexts must be one of {CONTEXTS}, got {self.contexts!r}")
        if self.matryoshka is not None:
            sizes = list(self.matryoshka)
            if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] >= self.d_transcoder:
                raise ValueError(
                    f"matryoshka must list increasing feature counts between 1 and d_transcoder - 1 "
                    f"({self.d_transcoder - 1}), e.g. [16, 64]; got {self.matryoshka!r}"
                )


@dataclass
class TranscoderTrainConfig(TranscoderTrainSettings):
    """The settings and the torch threads of the run (the pipeline's ``runtime.threads``)."""

    threads: int = 2
