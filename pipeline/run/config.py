"""The pipeline's configuration schema: one dataclass per config group.

``conf/<group>/<option>.yaml`` files are validated against these classes when Hydra
composes the configuration (:mod:`pipeline.run.compose` registers them; this module imports
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
      qk            QKSpec               head loadings of the top edges, QK attributions of the top heads
      features      FeaturesSpec         feature dashboards: corpus and what they record
      organism      OrganismSpec         the embedded toy world, its model and transcoders
      selectivity   SelectivitySpec      which features fire for one state / language only
      intervention  InterventionSpec     the intervene stage's checks (experiments: per prompt)
    StudyConfig     PipelineConfig + launcher (LauncherConfig) and out: a batch study
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pipeline.analysis.options import DashboardConfig, InterventionSettings
from pipeline.devices import ARITHMETIC_MODES, DEFAULT_ARITHMETIC, DTYPES, DeviceError, parse_device
from pipeline.engine.options import AttributionConfig
from pipeline.organism.config import ModelConfig, TrainSettings, TranscoderTrainSettings
from pipeline.organism.world import WorldConfig

#: A prompt id names DVC stages (``attribute@<id>``), params keys (``prompts.items.<id>``) and
#: output folders, so it is restricted to characters that are safe in all three.
PROMPT_ID = re.compile(r"^[A-Za-z0-9_-]+$")
#: the names Neuronpedia's upload accepts for ``scan`` and ``slug`` (pipeline.analysis.export's rule)
NEURONPEDIA_NAME = re.compile(r"[A-Za-z0-9_.-]+")

EXPERIMENT_KINDS: tuple[str, ...] = ("ablate", "steer", "swap")  # pipeline.analysis.evaluation_spec.KINDS
EXPERIMENT_MODES: tuple[str, ...] = ("iterative", "constrained", "direct")  # pipeline.analysis.evaluation_spec.MODES


@dataclass
class RuntimeConfig:
    """Where stages run. threads: torch CPU threads of every stage (set explicitly, since
    several torch processes sharing a few cores slow each other down many times over).
    device: where the stages that run the model compute (cpu, cuda, cuda:N, mps); the
    organism stages train on the CPU whatever it says. arithmetic: how the CPU's arithmetic is
    pinned (pipeline.devices.ARITHMETIC_MODES): ``portable`` (the default: code every x86-64 CPU
    runs, so that machines train the same organism) or ``native`` (this CPU's fastest reproducible
    code: faster, but another CPU trains another organism)."""

    threads: int = 2
    device: str = "cpu"
    arithmetic: str = DEFAULT_ARITHMETIC

    def __post_init__(self) -> None:
        if self.arithmetic not in ARITHMETIC_MODES:
            raise ValueError(f"runtime.arithmetic must be one of {ARITHMETIC_MODES}, got {self.arithmetic!r}")
        if self.threads < 1:
            raise ValueError(f"runtime.threads must be >= 1, got {self.threads}")
        try:
            parse_device(self.device)  # whether this machine has it: checked where the model loads
        except DeviceError as exc:
            raise ValueError(f"runtime.device: {exc}") from None


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
    (``pipeline.analysis.evaluation_spec.Experiment``, same fields; checked there when the stage runs).

    source / target: entries are ``[layer, pos, feature]`` triples, supernode names,
        selectors ``{pos: P, layers: [..], not_on_donor: bool}`` (every feature active at
        position P of this prompt (source) or of the donor (target), in those layers, all when
        omitted; ``not_on_donor``: only those inactive on the donor prompt), or selection rules
        ``{select: selective, label: L, role: R, value: V, in_graph: bool, layers: [..]}`` (the
        features selective for the prompt's value of L, or V, at role R: ``city``, ``last`` or
        ``any``; with in_graph, those of the pruned circuit; a target's on the donor, written at
        this prompt's position of the same role).
    donor: the swap's donor as a prompt id of the prompt set (its tags are known);
        donor_prompt: as a text (labeled when the organism's prompt bank holds it).
    kind: ``ablate`` | ``steer`` | ``swap``; expected_before / expected_after: the clean top
        token and the one the intervention should give (a flip: the top token changes to it);
        expected_language: the flip is the greedy continuation switching to this language
        instead; constrained_layers: the constrained mode's layers (circuit-tracer's);
        group: a label for per-group flip rates.
    """

    name: str
    kind: str = "ablate"
    source: List[Any] = field(default_factory=list)
    target: List[Any] = field(default_factory=list)
    donor: Optional[str] = None
    donor_prompt: Optional[str] = None
    source_factor: Optional[float] = None
    target_factor: float = 1.0
    value: Optional[float] = None
    open_ended: bool = False
    expected_before: Optional[str] = None
    expected_after: Optional[str] = None
    expected_language: Optional[str] = None
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
        default=0.8, metadata={"help": "share of influence on the logits the kept nodes carry", "check": "probability"}
    )
    edge_threshold: float = field(
        default=0.98, metadata={"help": "share of edge score mass the kept edges carry", "check": "probability"}
    )


@dataclass
class ExportSpec:
    """Graph files for the viewer (circuit-tracer / Neuronpedia JSON).

    slug_prefix: a graph's slug (and file name) is ``<slug_prefix><prompt id>``.
    scan: the transcoders' scan name in the graph metadata; None: the one the graph records
        (a hub set's repo), else the transcoders' source, with every character Neuronpedia
        refuses replaced by '_'. Both may hold only letters, digits, '_', '.' and '-'
        (Neuronpedia's rule; docs/viewer.md).
    """

    slug_prefix: str = ""
    scan: Optional[str] = None

    def __post_init__(self) -> None:
        if not NEURONPEDIA_NAME.fullmatch(self.slug_prefix or "x") or self.slug_prefix.startswith("."):
            raise ValueError(
                f"export.slug_prefix {self.slug_prefix!r} may hold only letters, digits, '_', '.' and '-' "
                "(Neuronpedia's rule for slugs; not starting with '.')"
            )
        if self.scan is not None and not NEURONPEDIA_NAME.fullmatch(self.scan):
            raise ValueError(
                f"export.scan {self.scan!r} may hold only letters, digits, '_', '.' and '-' (Neuronpedia's "
                "rule; it names a model Neuronpedia hosts, e.g. gemma-2-2b)"
            )


@dataclass
class QKSpec:
    """The qk stage (``pipeline.analysis.attention.explain_attention``): which attention heads
    carry the pruned graph's top edges, and why they attend where they do.

    edges: the top kept edges (by edge score) split across attention heads (head loadings).
    heads: how many of the heads carrying the most |loading| get a QK attribution.
    terms: how many query x key terms (and query / key marginals) each attribution lists.
    expand_attention: trace earlier layers' attention outputs through their OV circuits.
    chunk_size: edges per head-loadings chunk (one sweep each; lower it for memory on long prompts).
    """

    edges: int = field(
        default=200, metadata={"help": "top pruned-graph edges to split across heads", "check": "positive"}
    )
    heads: int = field(default=8, metadata={"help": "heads that get a QK attribution", "check": "positive"})
    terms: int = field(default=20, metadata={"help": "terms listed per QK attribution", "check": "positive"})
    expand_attention: bool = field(
        default=False, metadata={"help": "trace earlier attention outputs through their OV circuits"}
    )
    chunk_size: int = field(default=512, metadata={"help": "edges per head-loadings chunk", "check": "positive"})

    def __post_init__(self) -> None:
        for name in ("edges", "heads", "terms", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"qk.{name} must be a positive integer, got {value!r}: set it in conf/qk/default.yaml "
                    f"or override it (dvc exp run -S qk.{name}=N)"
                )


FEATURE_CORPORA: tuple[str, ...] = ("organism", "file", "hf")


@dataclass
class FeaturesSpec(DashboardConfig):
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
    The fields it extends are ``DashboardConfig``'s (what a dashboard records).
    """

    name: str = "plt"
    source: str = "organism"
    corpus: str = "data/organism/world.json"
    dep: str = "data/organism/world.json"
    n_documents: int = 2048
    field: str = "text"
    split: str = "train"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
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


SELECTIVITY_ROLES: tuple[str, ...] = ("city", "last", "any")  # pipeline.analysis.selectivity.ROLES


@dataclass
class SelectivitySpec:
    """Feature selectivity (the ``selectivity`` stage, ``pipeline.analysis.selectivity``): on
    the organism world's labeled two-hop prompts, which features fire for one value of a label
    and not for the others; the intervene stage's selection rules read the table.

    name: the table's file, ``data/selectivity/<name>.npz`` (default: the transcoders' kind).
    world: the world.json whose ``World.labeled_prompts()`` are counted (also the intervene
        stage's bank of same-state donors and its words' languages).
    labels / roles: what is counted (roles: ``city``, ``last``, ``any``).
    hi / lo: a feature is selective for (label, value, role) when it fires on at least ``hi``
        of that value's prompts and at most ``lo`` of all the others.
    """

    name: str = "plt"
    world: str = "data/organism/world.json"
    labels: List[str] = field(default_factory=lambda: ["state", "language"])
    roles: List[str] = field(default_factory=lambda: list(SELECTIVITY_ROLES))
    hi: float = 0.9
    lo: float = 0.05

    def __post_init__(self) -> None:
        if not PROMPT_ID.match(self.name):
            raise ValueError(f"selectivity.name names a file: it must match {PROMPT_ID.pattern}, got {self.name!r}")
        if not 0 <= self.lo < self.hi <= 1:
            raise ValueError(f"selectivity needs 0 <= lo < hi <= 1, got lo={self.lo}, hi={self.hi}")
        if not self.roles or not self.labels:
            raise ValueError("selectivity.roles and selectivity.labels must not be empty")


# The intervene stage's settings (the experiments are per prompt, in prompts.items.<id>.experiments):
# defined once, in pipeline.analysis.options, which evaluation_spec's EvaluationSpec extends.
InterventionSpec = InterventionSettings


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
    qk: QKSpec = field(default_factory=QKSpec)
    features: FeaturesSpec = field(default_factory=FeaturesSpec)
    organism: OrganismSpec = field(default_factory=OrganismSpec)
    selectivity: SelectivitySpec = field(default_factory=SelectivitySpec)
    intervention: InterventionSpec = field(default_factory=InterventionSpec)


# ------------------------------------------------------------------------------------ studies
LAUNCHERS: tuple[str, ...] = ("sequential", "local", "submitit_local", "submitit_slurm", "ray")


@dataclass
class SlurmSettings:
    """sbatch settings of ``submitit_slurm`` (submitit's names; see conf/launcher/).

    partition: ``--partition``; gpus_per_node: ``--gpus-per-node``; cpus_per_task:
    ``--cpus-per-task``; mem_gb: ``--mem``; account / qos / constraint: the same sbatch
    options; array_parallelism: at most this many array tasks run at once; setup: shell lines
    run before each job (``module load``, activating the environment); additional: any other
    sbatch option as ``{name: value}``.
    """

    partition: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 8.0
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 64
    setup: List[str] = field(default_factory=list)
    additional: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    """Where and how the jobs of a study run (``conf/launcher/<name>.yaml``).

    name: sequential | local | submitit_local | submitit_slurm | ray.
    jobs: jobs running at once (local: worker processes; submitit_local: job processes; ray:
        CPUs of the local Ray instance; submitit_slurm: ignored, see slurm.array_parallelism).
    prompts_per_job: prompts per job; None: 1 where workers keep the model loaded between
        jobs (local, ray, sequential), ``ceil(pending / jobs)`` for submitit_local, 1 for SLURM.
    threads: torch threads of each job. device: where jobs run the model: cpu, cuda (cuda:N
        for the engines that run jobs on this machine; Ray and SLURM give each job its own GPU,
        which it sees as ``cuda``).
    timeout_min: wall-time limit of a submitit job (SLURM ``--time``).
    ray_address: None starts a local Ray instance; "auto" or "ray://host:port" joins a cluster.
    ray_gpus_per_job: GPUs Ray reserves per job (a fraction shares one); None: 1 for a cuda
        device, else 0. Ray hides the GPUs from a job that reserves none.
    start_method: local: how worker processes start (fork, spawn, forkserver); None: fork on
        Linux for CPU jobs (workers inherit the planning process's loaded model), else spawn.
    folder: submitit's job folder (logs, pickles); None: ``STUDY_DIR/submitit``.
    """

    name: str = "local"
    jobs: int = 2
    prompts_per_job: Optional[int] = None
    threads: int = 1
    device: str = "cpu"
    timeout_min: float = 60.0
    ray_address: Optional[str] = None
    ray_gpus_per_job: Optional[float] = None
    folder: Optional[str] = None
    start_method: Optional[str] = None
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    def __post_init__(self) -> None:
        if self.name not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {LAUNCHERS}, got {self.name!r}")
        for name in ("jobs", "threads", "prompts_per_job"):
            value = getattr(self, name)
            if value is None and name == "prompts_per_job":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"launcher.{name} must be an integer >= 1, got {value!r}")
        if self.start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(
                f"launcher.start_method must be fork, spawn, forkserver or null, got {self.start_method!r}"
            )
        self._check_device()
        if isinstance(self.timeout_min, bool) or not isinstance(self.timeout_min, (int, float)):
            raise ValueError(f"launcher.timeout_min must be a number, got {self.timeout_min!r}")
        if self.timeout_min <= 0:
            raise ValueError(f"launcher.timeout_min must be positive, got {self.timeout_min}")

    def _check_device(self) -> None:
        """The device names a device, and the engine gives jobs on it a GPU (checked here, where
        the study plans: a SLURM login node has no GPU, the nodes that run the jobs do)."""
        try:
            device = parse_device(self.device)
        except DeviceError as exc:
            raise ValueError(f"launcher.device: {exc}") from None
        if device.type == "cuda" and device.index is not None and self.name in ("ray", "submitit_slurm"):
            raise ValueError(
                f"launcher.device {self.device!r}: {self.name} gives each job its own GPU, which the job "
                "sees as cuda: use launcher.device=cuda"
            )
        if device.type == "cuda" and self.name == "ray" and self.ray_gpus_per_job is not None:
            if self.ray_gpus_per_job <= 0:
                raise ValueError(
                    "launcher.ray_gpus_per_job is 0 with launcher.device cuda: Ray would hide the GPUs from "
                    "every job; reserve some (launcher.ray_gpus_per_job=1, or 0.5 to share one GPU by two jobs)"
                )
        if device.type == "cuda" and self.name == "submitit_slurm" and self.slurm.gpus_per_node < 1:
            raise ValueError(
                "launcher.slurm.gpus_per_node is 0 with launcher.device cuda: the jobs would get no GPU; "
                "set launcher.slurm.gpus_per_node=1 (or launcher.device=cpu for a CPU partition)"
            )

    def gpus_per_job(self) -> float:
        """The GPUs a job reserves where the engine reserves them (Ray): ray_gpus_per_job, by
        default 1 for a cuda device and 0 for the CPU."""
        if self.ray_gpus_per_job is not None:
            return float(self.ray_gpus_per_job)
        return 1.0 if parse_device(self.device).type == "cuda" else 0.0


@dataclass
class StudyConfig(PipelineConfig):
    """A batch study (``circuit-pipeline study``, ``conf/study.yaml``): the pipeline's choices,
    of which a study uses model, transcoders, prompts, attribution, pruning and export.scan,
    plus where its jobs run and its folder (``out``; None: ``studies/<prompt set name>``)."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    out: Optional[str] = None
