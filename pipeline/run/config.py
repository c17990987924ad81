"""The pipeline's configuration schema: one dataclass per config group.

``conf/<group>/<option>.yaml`` files are validated against these classes when Hydra
composes the configuration (``stages/_config.py`` registers them; this module imports
neither Hydra nor OmegaConf), and every DVC stage loads the composed ``params.yaml`` into
:class:`PipelineConfig` before it reads a value. A field without a default is required: a
choice file must set it.

Where the library has a config class, the schema uses it (``attribution`` extends
``AttributionConfig``; ``organism`` is made of the organism's own configs), so an option is
defined, defaulted and checked in one place. Field types are kept to what a structured
config can check (str, int, float, bool, Optional, List, Tuple, Dict, nested dataclasses).

    PipelineConfig
      runtime       RuntimeConfig        threads, device
      model         ModelSpec            which model: hub id or local directory
      transcoders   TranscodersSpec      which transcoders: hub repo or local directory
      prompts       PromptSetSpec        prompt set: {prompt id: PromptSpec}
      attribution   AttributionSpec      pipeline.engine.attribution.AttributionConfig + load dtype
      pruning       PruningSpec          node/edge thresholds
      export        ExportSpec           graph files
      features      FeaturesSpec         feature dashboards: corpus and what they record
      organism      OrganismSpec         the embedded toy world, its model and transcoders
      intervention  InterventionSpec     the intervene stage's checks (experiments: per prompt)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pipeline.engine.attribution import AttributionConfig
from pipeline.organism.train_model import ModelConfig, TrainSettings
from pipeline.organism.train_transcoders import TranscoderTrainSettings
from pipeline.organism.world import WorldConfig

#: A prompt id names DVC stages (``attribute@<id>``), params keys (``prompts.items.<id>``) and
#: output folders, so it is restricted to characters that are safe in all three.
PROMPT_ID = re.compile(r"^[A-Za-z0-9_-]+$")

DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
EXPERIMENT_KINDS: tuple[str, ...] = ("ablate", "steer", "swap")  # pipeline.analysis.evaluation.KINDS
EXPERIMENT_MODES: tuple[str, ...] = ("iterative", "constrained", "direct")  # pipeline.analysis.evaluation.MODES


@dataclass
class RuntimeConfig:
    """Where stages run. threads: torch CPU threads of every stage (set explicitly, since
    several torch processes sharing a few cores slow each other down many times over)."""

    threads: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"runtime.threads must be >= 1, got {self.threads}")


@dataclass
class ModelSpec:
    """The base model.

    name: what the loader receives: a Hugging Face repo id, or a local directory (relative
        to the repository root) in Hugging Face format.
    dep: the path DVC tracks for this model: the local directory when the pipeline builds
        or holds the model, else this choice's own conf file (a hub model is identified by
        ``name`` + ``revision``, which the stages track as params).
    revision: hub revision (branch, tag or commit); pin a commit for reproducible studies.
    """

    name: str
    dep: str
    revision: Optional[str] = None


@dataclass
class TranscodersSpec:
    """The transcoders (circuit-tracer on-disk format).

    source: a local directory holding ``config.yaml``, or a hub repo id
        (``org/repo``, ``org/repo//subfolder``).
    kind: ``plt`` (per-layer transcoders) or ``clt`` (cross-layer transcoder): documents the
        choice and is checked against the loaded set.
    dep: the path DVC tracks (as for ``ModelSpec.dep``).
    revision: hub revision.
    """

    source: str
    kind: str
    dep: str
    revision: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in ("plt", "clt"):
            raise ValueError(f"transcoders.kind must be 'plt' or 'clt', got {self.kind!r}")


@dataclass
class ExperimentSpec:
    """A named intervention experiment on one prompt, run by the ``intervene`` stage
    (``pipeline.analysis.evaluation.Experiment``, same fields; checked there when the stage runs).

    source / target: entries are ``[layer, pos, feature]`` triples, supernode names, or
        selectors ``{pos: P, layers: [..], not_on_donor: bool}`` (every feature active at
        position P of this prompt (source) or of ``donor_prompt`` (target), in those layers,
        all when omitted; ``not_on_donor``: only those inactive on the donor prompt).
    kind: ``ablate`` | ``steer`` | ``swap``; expected_before / expected_after: the top token
        before / after, for the flip check; group: a label for per-group flip rates.
    """

    name: str
    kind: str = "ablate"
    source: List[Any] = field(default_factory=list)
    target: List[Any] = field(default_factory=list)
    donor_prompt: Optional[str] = None
    source_factor: Optional[float] = None
    target_factor: float = 1.0
    value: Optional[float] = None
    open_ended: bool = False
    expected_before: Optional[str] = None
    expected_after: Optional[str] = None
    mode: str = "iterative"
    constrained_layers: Optional[List[int]] = None
    max_new_tokens: Optional[int] = None
    group: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in EXPERIMENT_KINDS:
            raise ValueError(f"experiment {self.name!r}: kind must be one of {EXPERIMENT_KINDS}, got {self.kind!r}")
        if self.mode not in EXPERIMENT_MODES:
            raise ValueError(f"experiment {self.name!r}: mode must be one of {EXPERIMENT_MODES}, got {self.mode!r}")


@dataclass
class PromptSpec:
    """One prompt. Its id is its key in ``PromptSetSpec.items``.

    answer: the expected next token (reports compare against it); None if unknown.
    kind, language, tags: free-form labels for reports and figures.
    logit_targets: attribute from these tokens instead of the top logits; ``"A,B"`` is the
        difference of the logits of A and B.
    experiments: the intervention experiments the ``intervene`` stage runs on this prompt.
    """

    prompt: str
    answer: Optional[str] = None
    kind: str = ""
    language: str = ""
    tags: List[str] = field(default_factory=list)
    logit_targets: List[str] = field(default_factory=list)
    experiments: List[ExperimentSpec] = field(default_factory=list)


@dataclass
class PromptSetSpec:
    """A prompt set: ``items`` maps a prompt id to its prompt. The per-prompt DVC stages are
    one per id, and each depends only on ``prompts.items.<id>``."""

    name: str
    items: Dict[str, PromptSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k in self.items if not PROMPT_ID.match(k)]
        if bad:
            raise ValueError(f"prompt ids must match {PROMPT_ID.pattern}: {bad}")


@dataclass
class AttributionSpec(AttributionConfig):
    """The options of ``pipeline.engine.attribution.attribute`` (its ``AttributionConfig``) and
    the dtype the model and transcoders load in."""

    dtype: str = field(default="float32", metadata={"help": "load dtype of model and transcoders", "choices": DTYPES})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in DTYPES:
            raise ValueError(f"attribution.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class PruningSpec:
    """The thresholds of ``pipeline.graph.pruning.prune_graph``."""

    node_threshold: float = field(
        default=0.8, metadata={"help": "share of influence on the logits the kept nodes carry"}
    )
    edge_threshold: float = field(default=0.98, metadata={"help": "share of edge score mass the kept edges carry"})


@dataclass
class ExportSpec:
    """Graph files for the viewer (circuit-tracer / Neuronpedia JSON).

    slug_prefix: a graph's slug (and file name) is ``<slug_prefix><prompt id>``.
    scan: the transcoders' scan name in the graph metadata; None: the one the graph records
        (a hub set's repo), else the transcoders' source.
    """

    slug_prefix: str = ""
    scan: Optional[str] = None


FEATURE_CORPORA: tuple[str, ...] = ("organism", "file", "hf")


@dataclass
class FeaturesSpec:
    """Feature dashboards of the configured transcoders (the ``features`` stage, see
    ``pipeline.analysis.dashboards``): one store, ``data/dashboards/<name>.zarr``, whose labels and
    per-feature records the export stage uses.

    name: the store's name (default: the transcoders' kind, so the organism's PLT and CLT
        stores sit side by side).
    source: where the texts come from: ``organism`` (sentences of the world's corpus,
        ``corpus`` = the world.json), ``file`` (``corpus`` = a .txt, one document per line, or
        a .jsonl with a ``field``), ``hf`` (``corpus`` = a Hugging Face dataset name).
    corpus / dep: see source; dep is the path DVC tracks (the file; for ``hf``, a conf file).
    n_documents: sentences drawn from the organism's world. split: the dataset split (hf).
    dtype: the model's dtype while streaming the corpus.
    The rest are ``pipeline.analysis.dashboards.DashboardConfig`` fields (same meaning).
    """

    name: str = "plt"
    source: str = "organism"
    corpus: str = "data/organism/world.json"
    dep: str = "data/organism/world.json"
    n_documents: int = 2048
    field: str = "text"
    split: str = "train"
    dtype: str = "float32"
    top_k: int = 20
    n_quantiles: int = 5
    examples_per_quantile: int = 4
    context_before: int = 8
    context_after: int = 4
    n_logits: int = 10
    batch_tokens: int = 2048
    seq_len: Optional[int] = None
    max_tokens: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in FEATURE_CORPORA:
            raise ValueError(f"features.source must be one of {FEATURE_CORPORA}, got {self.source!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"features.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not PROMPT_ID.match(self.name):
            raise ValueError(f"features.name names a file: it must match {PROMPT_ID.pattern}, got {self.name!r}")


@dataclass
class OrganismSpec:
    """The model organism: world -> model -> transcoders (PLT with skip, CLT), as the library's
    own configs (``pipeline.organism``); the training threads come from ``runtime.threads``."""

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    plt: TranscoderTrainSettings = field(default_factory=TranscoderTrainSettings)
    clt: TranscoderTrainSettings = field(default_factory=lambda: TranscoderTrainSettings(skip=False))


@dataclass
class InterventionSpec:
    """The ``intervene`` stage (``pipeline.analysis.evaluation.EvaluationSpec``; the experiments are
    per prompt, in ``prompts.items.<id>.experiments``).

    top_k: features (by influence) ablated one at a time and compared with the attribution.
    faithfulness: run the circuit-only / circuit-ablated / all-ablated comparison.
    freeze_attention: attention patterns frozen in the iterative runs.
    errors: ``frozen`` (the local replacement model) or ``recomputed`` error vectors.
    n_top_tokens: rows of the before / after top-token tables.
    max_new_tokens: greedy generation length per experiment (clean and steered; 0: none).
    """

    top_k: int = 10
    faithfulness: bool = True
    freeze_attention: bool = True
    errors: str = "frozen"
    n_top_tokens: int = 5
    max_new_tokens: int = 5

    def __post_init__(self) -> None:
        if self.errors not in ("frozen", "recomputed"):
            raise ValueError(f"intervention.errors must be 'frozen' or 'recomputed', got {self.errors!r}")
        for name in ("top_k", "n_top_tokens", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"intervention.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class PipelineConfig:
    """The whole composed configuration (``params.yaml``)."""

    model: ModelSpec
    transcoders: TranscodersSpec
    prompts: PromptSetSpec
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    attribution: AttributionSpec = field(default_factory=AttributionSpec)
    pruning: PruningSpec = field(default_factory=PruningSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    features: FeaturesSpec = field(default_factory=FeaturesSpec)
    organism: OrganismSpec = field(default_factory=OrganismSpec)
    intervention: InterventionSpec = field(default_factory=InterventionSpec)
