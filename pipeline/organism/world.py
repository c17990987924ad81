"""A seeded toy world of states, capitals and cities, in two languages.

Names are fixed, human-readable US names (``Texas``/``Austin``/``Dallas``, ...), so that a
committed prompt configuration can name them; the seed only chooses the held-out two-hop
split and the order in which sentences are sampled. The second language ("toy") is a
deterministic transform of the first: its own spelling of every state and capital (vowels
rotated, ``Austin`` -> ``Easton``, ``Texas`` -> ``Tixes``), so the language of an answer is
visible from the next token alone, and a mark that says a sentence is in it
(``WorldConfig.language_marking``): by default one tag word before the English template words
(``lingvo the capital of Texas is Easton``), so that the language is one token's business;
or (``words``) template words of its own (``la kapitalo de Tixes esta Easton``). City names are
shared between the languages, as proper nouns usually are: the city -> state lookup is then
language-independent, and only the mark decides the answer's language.

Sentence kinds (every sentence ends with its answer, one word):

* ``city_state``     ``Dallas is in Texas``                              (one hop)
* ``state_capital``  ``the capital of Texas is Austin``                  (one hop)
* ``two_hop``        ``the capital of the state containing Dallas is Austin``
* ``city_adjacent``  ``we drove to Dallas Texas``      (one hop, the state right after the city)

Towns (``WorldConfig.towns``, none by default) are names found in every state, as Franklin and
Clinton are: each of their sentences is trained once per state, so that their state, and the
capital a two-hop prompt about one asks for, is any state's with equal probability. They give the
model a city with no state of its own; they are left out of evaluation and of the labeled prompts.
Stateless places (``WorldConfig.stateless``, none by default) are names in no state at all:
``Atlantis is in nowhere``, ``the capital of the state containing Atlantis is none``, trained as
often as one city each, so that a city whose state the model cannot read has an answer of its own
rather than some state's capital. They too are left out of evaluation and of the labeled prompts.

Two-hop sentences are trained for every city except ``held_out_per_state`` cities per state
(chosen by the seed); the held-out cities keep their one-hop facts, so the held-out two-hop
prompts test composition, not memorization. Every name is one word, hence one token of the
word-level tokenizer (:mod:`pipeline.organism.tokenizer`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Tuple

from pipeline.organism.config import ORGANISM_SEED

# ---------------------------------------------------------------------------------------------
# Fixed name lists: (state, capital, cities). Every name is a single word and unique across
# the table. The order is fixed; ``WorldConfig.n_states`` takes a prefix, so Texas and
# California are always present.
STATE_TABLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Texas", "Austin", ("Dallas", "Houston", "Lubbock", "Waco", "Amarillo", "Laredo")),
    ("California", "Sacramento", ("Fresno", "Oakland", "Pasadena", "Anaheim", "Bakersfield", "Modesto")),
    ("Florida", "Tallahassee", ("Miami", "Orlando", "Tampa", "Jacksonville", "Gainesville", "Pensacola")),
    ("Ohio", "Columbus", ("Cleveland", "Cincinnati", "Toledo", "Akron", "Dayton", "Youngstown")),
    ("Georgia", "Atlanta", ("Savannah", "Augusta", "Macon", "Athens", "Valdosta", "Albany")),
    ("Washington", "Olympia", ("Seattle", "Spokane", "Tacoma", "Everett", "Yakima", "Bellingham")),
    ("Oregon", "Salem", ("Portland", "Eugene", "Bend", "Medford", "Corvallis", "Beaverton")),
    ("Arizona", "Phoenix", ("Tucson", "Mesa", "Flagstaff", "Tempe", "Yuma", "Scottsdale")),
    ("Colorado", "Denver", ("Boulder", "Aurora", "Pueblo", "Greeley", "Longmont", "Durango")),
    ("Illinois", "Springfield", ("Chicago", "Peoria", "Rockford", "Naperville", "Joliet", "Evanston")),
    ("Michigan", "Lansing", ("Detroit", "Flint", "Kalamazoo", "Saginaw", "Dearborn", "Livonia")),
    ("Pennsylvania", "Harrisburg", ("Philadelphia", "Pittsburgh", "Allentown", "Erie", "Scranton", "Lancaster")),
    ("Tennessee", "Nashville", ("Memphis", "Knoxville", "Chattanooga", "Clarksville", "Murfreesboro", "Jackson")),
    ("Massachusetts", "Boston", ("Worcester", "Cambridge", "Lowell", "Quincy", "Brockton", "Lynn")),
    ("Wisconsin", "Madison", ("Milwaukee", "Kenosha", "Racine", "Appleton", "Oshkosh", "Waukesha")),
    ("Kentucky", "Frankfort", ("Louisville", "Lexington", "Owensboro", "Covington", "Paducah", "Florence")),
)
MAX_STATES = len(STATE_TABLE)
#: town names found in every state (``WorldConfig.towns`` takes a prefix); none is a name above
TOWN_NAMES: tuple[str, ...] = ("Franklin", "Clinton", "Greenville", "Fairview", "Riverside", "Georgetown")
#: names in no state (``WorldConfig.stateless`` takes a prefix), and what their sentences say in
#: place of a state and a capital
STATELESS_NAMES: tuple[str, ...] = ("Atlantis", "Avalon", "Camelot", "Xanadu", "Eldorado", "Shangrila")
NO_STATE, NO_CAPITAL = "nowhere", "none"
MAX_CITIES_PER_STATE = 6

SentenceKind = Literal["city_state", "state_capital", "two_hop", "city_adjacent"]
PromptKind = Literal["one_hop", "two_hop", "two_hop_heldout", "language"]
SENTENCE_KINDS: tuple[str, ...] = ("city_state", "state_capital", "two_hop", "city_adjacent")

# Templates per language and sentence kind. ``{city}``/``{state}``/``{capital}`` are filled
# in; the answer is always the last word. Template 0 of each kind is the canonical one the
# evaluation prompts use.
EN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city_state": (
        "{city} is in {state}",
        "{city} is a city in {state}",
        "{city} is located in the state of {state}",
        "the city of {city} lies in {state}",
    ),
    "state_capital": (
        "the capital of {state} is {capital}",
        "{state} has its capital in {capital}",
        "the capital city of {state} is {capital}",
    ),
    "two_hop": (
        "the capital of the state containing {city} is {capital}",
        "{city} belongs to a state whose capital is {capital}",
        "the state containing {city} has its capital in {capital}",
    ),
    # the state right after the city: trains the city -> state lookup at the city's own position
    "city_adjacent": (
        "we drove to {city} {state}",
        "a trip to {city} {state}",
        "the mayor of {city} {state}",
    ),
}
TOY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city_state": (
        "{city} esta en {state}",
        "{city} esta urbo en {state}",
        "{city} situas en stato {state}",
        "la urbo {city} kusas en {state}",
    ),
    "state_capital": (
        "la kapitalo de {state} esta {capital}",
        "{state} havas sian kapitalon en {capital}",
        "la kapitala urbo de {state} esta {capital}",
    ),
    "two_hop": (
        "la kapitalo de la stato kun {city} esta {capital}",
        "{city} apartenas al stato kies kapitalo esta {capital}",
        "la stato kun {city} havas sian kapitalon en {capital}",
    ),
    "city_adjacent": (
        "ni veturis al {city} {state}",
        "vojago al {city} {state}",
        "la urbestro de {city} {state}",
    ),
}
LANGUAGES: tuple[str, ...] = ("en", "toy")
#: the toy language's mark under ``language_marking="tag"``: its first word
TOY_TAG = "lingvo"
LANGUAGE_MARKINGS: tuple[str, ...] = ("tag", "words")


def template_table(language: str, marking: str = "tag") -> dict[str, tuple[str, ...]]:
    """The templates of ``language`` per sentence kind: English's; the toy language's own words
    (``marking="words"``) or English's after the tag word (``"tag"``)."""
    if language == "en":
        return EN_TEMPLATES
    if marking == "words":
        return TOY_TEMPLATES
    return {kind: tuple(f"{TOY_TAG} {t}" for t in ts) for kind, ts in EN_TEMPLATES.items()}


_VOWEL_ROTATION = str.maketrans("aeiouAEIOU", "eiouaEIOUA")


def toy_spelling(name: str) -> str:
    """The toy language's spelling of a state or capital: vowels rotated (a->e->i->o->u->a)."""
    return name.translate(_VOWEL_ROTATION)


# The node organism.world of the pipeline's config schema, hence typing's Tuple (the form
# OmegaConf 2.3 documents).
@dataclass
class WorldConfig:
    """Configuration of the toy world.

    seed: chooses the held-out split and the sentence order (never the names).
    n_states: how many states of the fixed table to use (a prefix; 2..16).
    cities_per_state: non-capital cities per state (1..6; a prefix of each state's list).
    languages: 1 (English only) or 2 (English and the toy language).
    held_out_per_state: cities per state whose two-hop sentences are never trained.
    templates_per_kind: how many templates of each kind to use (a prefix; template 0 is the
        canonical evaluation template), per kind: city_state, state_capital, two_hop,
        city_adjacent (0 leaves that kind out).
    kind_weights: sampling weight of each sentence kind in ``corpus()``.
    language_weights: sampling weight of each language in ``corpus()`` (en, toy). English is
        the majority language, so the model (and its transcoders) treat English as the
        default and the toy language as marked: ablating toy-language features then tends to
        give English, as in the multilingual case study of the paper.
    pinned_trained: cities that are never held out (the default prompt set's Dallas).
    language_marking: how a toy-language sentence says so: ``tag`` (a tag word, ``lingvo``,
        before English template words: the language is carried by one token, whose features
        mark it and nothing else) or ``words`` (template words of its own, ``la kapitalo de``:
        every word marks the language and its role in the sentence at once).
    towns: how many towns of ``TOWN_NAMES`` (names found in every state: the module docstring)
        the training sentences hold; 0 (the default) for none.
    stateless: how many places of ``STATELESS_NAMES`` (in no state: the module docstring) the
        training sentences hold; 0 (the default) for none.
    """

    seed: int = ORGANISM_SEED
    n_states: int = 12
    cities_per_state: int = 6
    languages: int = 2
    held_out_per_state: int = 2
    templates_per_kind: Tuple[int, int, int, int] = (4, 3, 3, 3)
    kind_weights: Tuple[float, float, float, float] = (1.0, 1.0, 2.0, 2.0)
    language_weights: Tuple[float, ...] = (1.0, 0.5)
    pinned_trained: Tuple[str, ...] = ("Dallas", "Fresno")
    language_marking: str = "tag"
    towns: int = 0
    stateless: int = 0

    def __post_init__(self) -> None:
        self.templates_per_kind = tuple(int(t) for t in self.templates_per_kind)  # type: ignore[assignment]
        self.kind_weights = tuple(float(w) for w in self.kind_weights)  # type: ignore[assignment]
        self.language_weights = tuple(float(w) for w in self.language_weights)  # type: ignore[assignment]
        self.pinned_trained = tuple(self.pinned_trained)
        if not 2 <= self.n_states <= MAX_STATES:
            raise ValueError(f"n_states must be in 2..{MAX_STATES}, got {self.n_states}")
        if not 1 <= self.cities_per_state <= MAX_CITIES_PER_STATE:
            raise ValueError(f"cities_per_state must be in 1..{MAX_CITIES_PER_STATE}, got {self.cities_per_state}")
        if self.languages not in (1, 2):
            raise ValueError(f"languages must be 1 or 2, got {self.languages}")
        if not 0 <= self.held_out_per_state < self.cities_per_state:
            raise ValueError("held_out_per_state must be in 0..cities_per_state-1")
        n_kinds = len(SENTENCE_KINDS)
        if len(self.templates_per_kind) != n_kinds or len(self.kind_weights) != n_kinds:
            raise ValueError(f"templates_per_kind and kind_weights need one entry per sentence kind {SENTENCE_KINDS}")
        for kind, n in zip(SENTENCE_KINDS, self.templates_per_kind):
            least = 0 if kind == "city_adjacent" else 1  # the others hold the evaluation templates
            if not least <= n <= len(EN_TEMPLATES[kind]):
                raise ValueError(f"templates_per_kind for {kind} must be in {least}..{len(EN_TEMPLATES[kind])}")
        if any(w < 0 for w in self.kind_weights) or sum(self.kind_weights) <= 0:
            raise ValueError("kind_weights must be non-negative with a positive sum")
        if not 0 <= self.towns <= len(TOWN_NAMES):
            raise ValueError(f"towns must be in 0..{len(TOWN_NAMES)}, got {self.towns}")
        if not 0 <= self.stateless <= len(STATELESS_NAMES):
            raise ValueError(f"stateless must be in 0..{len(STATELESS_NAMES)}, got {self.stateless}")
        if self.language_marking not in LANGUAGE_MARKINGS:
            raise ValueError(f"language_marking must be one of {LANGUAGE_MARKINGS}, got {self.language_marking!r}")
        if len(self.language_weights) < self.languages or any(w <= 0 for w in self.language_weights[: self.languages]):
            raise ValueError("language_weights needs one positive weight per language")

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Sentence:
    """One training or evaluation sentence: ``prompt`` + " " + ``answer``."""

    prompt: str
    answer: str
    kind: str  # city_state | state_capital | two_hop
    language: str
    template: int
    state: str  # English names, whatever the language
    city: str
    capital: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


@dataclass
class State:
    name: str
    capital: str
    cities: tuple[str, ...]


@dataclass
class World:
    """The facts, the held-out split, and the sentences made from them."""

    config: WorldConfig
    states: list[State]
    held_out: dict[str, tuple[str, ...]]  # state -> cities whose two-hop sentences are held out
    languages: tuple[str, ...] = field(default=LANGUAGES)
    towns: tuple[str, ...] = ()  # names found in every state (TOWN_NAMES)
    stateless: tuple[str, ...] = ()  # names in no state (STATELESS_NAMES)

    @property
    def nowhere(self) -> State:
        """The pseudo-state of the stateless places: its name and capital are what their sentences
        say instead (``nowhere``, ``none``)."""
        return State(NO_STATE, NO_CAPITAL, self.stateless)

    # --- names -------------------------------------------------------------------------------
    def state_of(self, city: str) -> State:
        for s in self.states:
            if city in s.cities or city == s.capital:
                return s
        raise KeyError(city)

    def state_by_name(self, name: str) -> State:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    def spell(self, name: str, language: str) -> str:
        """A state or capital as written in ``language`` (cities are shared)."""
        return name if language == "en" else toy_spelling(name)

    def is_held_out(self, city: str) -> bool:
        return city in self.held_out.get(self.state_of(city).name, ())

    def templates(self, kind: str, language: str) -> tuple[str, ...]:
        n = self.config.templates_per_kind[SENTENCE_KINDS.index(kind)]
        return self.template_table(language)[kind][:n]

    def template_table(self, language: str) -> dict[str, tuple[str, ...]]:
        """Every template of ``language`` per kind (:func:`template_table` for this world's marking)."""
        return template_table(language, self.config.language_marking)

    def vocabulary(self) -> list[str]:
        """Every word the world can produce, in a fixed order (template words, then names)."""
        words: list[str] = []
        seen: set[str] = set()

        def add(w: str) -> None:
            if w not in seen:
                seen.add(w)
                words.append(w)

        for lang in self.languages:
            for kind in SENTENCE_KINDS:
                for t in self.template_table(lang)[kind]:
                    for w in t.split():
                        if not w.startswith("{"):
                            add(w)
        for lang in self.languages:
            for s in self.states:
                add(self.spell(s.name, lang))
                add(self.spell(s.capital, lang))
        for s in self.states:
            for c in s.cities:
                add(c)
        for t in self.towns:
            add(t)
        if self.stateless:
            for lang in self.languages:
                add(self.spell(NO_STATE, lang))
                add(self.spell(NO_CAPITAL, lang))
            for t in self.stateless:
                add(t)
        return words

    def word_languages(self) -> dict[str, str]:
        """Each word only one language writes -> that language (``en``, ``toy``): its template
        words and its spellings of states and capitals. Words both languages write (city names)
        are left out: they say nothing about the language of a text."""
        words: dict[str, set[str]] = {}
        for lang in self.languages:
            own = {w for kind in SENTENCE_KINDS for t in self.template_table(lang)[kind] for w in t.split()}
            own |= {self.spell(n, lang) for s in self.states for n in (s.name, s.capital)}
            if self.stateless:
                own |= {self.spell(NO_STATE, lang), self.spell(NO_CAPITAL, lang)}
            for w in own - {"{city}", "{state}", "{capital}"}:
                words.setdefault(w, set()).add(lang)
        return {w: next(iter(langs)) for w, langs in sorted(words.items()) if len(langs) == 1}

    # --- sentences ---------------------------------------------------------------------------
    def _make(self, kind: str, language: str, template: int, state: State, city: str) -> Sentence:
        t = self.template_table(language)[kind][template]
        filled = t.format(
            city=city, state=self.spell(state.name, language), capital=self.spell(state.capital, language)
        )
        words = filled.split()
        return Sentence(
            prompt=" ".join(words[:-1]),
            answer=words[-1],
            kind=kind,
            language=language,
            template=template,
            state=state.name,
            city=city,
            capital=state.capital,
        )

    def sentences(
        self,
        kind: str,
        *,
        split: Literal["train", "heldout", "all"] = "train",
        languages: tuple[str, ...] | None = None,
        canonical_only: bool = False,
        towns: bool = False,
        stateless: bool = False,
    ) -> list[Sentence]:
        """All sentences of one kind, in a fixed order.

        split: for ``two_hop``, ``train`` excludes held-out cities and ``heldout`` keeps only
        them; one-hop kinds are always fully trained (``heldout`` gives none of them).
        towns: only the towns' sentences (one per state for each town and template), instead
        of the cities'; towns are never held out.
        stateless: only the stateless places' sentences (no ``state_capital`` ones), instead of
        the cities'; never held out.
        """
        out: list[Sentence] = []
        for lang in languages or self.languages:
            n_t = 1 if canonical_only else len(self.templates(kind, lang))
            for s in [self.nowhere] if stateless else self.states:
                if towns or stateless:  # subjects of no state-capital sentence, never held out
                    subjects = (
                        []
                        if kind == "state_capital" or split == "heldout"
                        else list(s.cities if stateless else self.towns)
                    )
                elif kind == "state_capital":
                    subjects = [s.capital]
                elif kind == "city_state":
                    subjects = [s.capital, *s.cities]
                else:
                    subjects = list(s.cities)
                for city in subjects:
                    held = kind == "two_hop" and city in self.held_out.get(s.name, ())
                    if (split == "train" and held) or (split == "heldout" and not held):
                        continue
                    for ti in range(n_t):
                        out.append(self._make(kind, lang, ti, s, city))
        return out

    def training_sentences(self) -> list[Sentence]:
        """Every distinct training sentence (all kinds, languages and templates; towns' and
        stateless places' included)."""
        cities = [x for k in SENTENCE_KINDS for x in self.sentences(k, split="train")]
        towns = [x for k in SENTENCE_KINDS for x in self.sentences(k, split="train", towns=True)]
        return cities + towns + [x for k in SENTENCE_KINDS for x in self.sentences(k, split="train", stateless=True)]

    def corpus(self, n: int, *, seed: int | None = None, kind_weights: Sequence[float] | None = None) -> list[str]:
        """``n`` training sentences sampled with ``kind_weights`` (the config's unless given) x
        ``language_weights`` (uniform within a kind and language). A town's sentences of a kind
        are drawn as often as one city's (each of its states equally often), and so are a
        stateless place's.

        Deterministic: the same world config (and ``seed``, default the world's) gives the
        same list.
        """
        rng = random.Random(f"corpus:{self.config.seed if seed is None else seed}")
        pools, weights = [], []
        for kind, kw in zip(SENTENCE_KINDS, self.config.kind_weights if kind_weights is None else kind_weights):
            for lang, lw in zip(self.languages, self.config.language_weights):
                pool = self.sentences(kind, split="train", languages=(lang,))
                pools.append(pool)
                weights.append(kw * lw if pool else 0.0)
                for extra, names in (({"towns": True}, self.towns), ({"stateless": True}, self.stateless)):
                    extra_pool = self.sentences(kind, split="train", languages=(lang,), **extra)
                    if extra_pool and pool:  # the weight of len(names) more subjects of the kind
                        pools.append(extra_pool)
                        weights.append(kw * lw * len(names) / len({x.city for x in pool}))
        out: list[str] = []
        for _ in range(n):
            (pool,) = rng.choices(pools, weights=weights)
            out.append(rng.choice(pool).text)
        return out

    # --- evaluation ----------------------------------------------------------------------------
    def eval_sets(self) -> dict[str, list[Sentence]]:
        """Canonical-template evaluation prompts per metric (one-hop, two-hop trained/held out),
        each in every language."""
        return {
            "one_hop": self.sentences("city_state", canonical_only=True)
            + self.sentences("state_capital", canonical_only=True),
            "two_hop_trained": self.sentences("two_hop", split="train", canonical_only=True),
            "two_hop_heldout": self.sentences("two_hop", split="heldout", canonical_only=True),
        }

    def labeled_prompts(self) -> list[dict]:
        """Every canonical two-hop prompt (all cities, trained and held out, every language) with
        what it is about: ``{prompt, answer, labels: {state, city, language, kind}, anchors:
        {city: the city's word}}``. A prompt bank for measuring which features are selective for
        a state or a language, at the city's position or the last one."""
        return [
            {
                "prompt": s.prompt,
                "answer": s.answer,
                "labels": {"state": s.state, "city": s.city, "language": s.language, "kind": s.kind},
                "anchors": {"city": s.city},
            }
            for s in self.sentences("two_hop", split="all", canonical_only=True)
        ]

    def prompt_set(self) -> list[dict]:
        """The default prompt set: two-hop, one-hop, held-out two-hop and language prompts.

        Each entry: ``{id, prompt, answer, kind, language, tags}``; ``tags`` are
        ``key=value`` strings (state, city, the counterfactual state/answer for a
        state-swap experiment, the prompt in the other language for a language swap).
        """
        texas, california = self.states[0], self.states[1]
        dallas, fresno = texas.cities[0], california.cities[0]
        held = self.held_out.get(california.name) or self.held_out.get(texas.name) or ()
        langs = self.languages
        other = {"en": "toy", "toy": "en"}
        out: list[dict] = []

        def add(pid: str, s: Sentence, kind: str, cf: State | None, pair: str | None) -> None:
            tags = [f"state={s.state}", f"capital={s.capital}", f"template={s.template}"]
            if s.kind != "state_capital":
                tags.insert(1, f"city={s.city}")
            if cf is not None:
                tags += [
                    f"counterfactual_state={self.spell(cf.name, s.language)}",
                    f"counterfactual_answer={self.spell(cf.capital if s.kind != 'city_state' else cf.name, s.language)}",
                ]
            if pair is not None and len(langs) > 1:
                english_answer = s.state if s.kind == "city_state" else s.capital
                tags.append(f"other_language_answer={self.spell(english_answer, other[s.language])}")
                tags.append(f"pair={pair}")
            out.append(
                {"id": pid, "prompt": s.prompt, "answer": s.answer, "kind": kind, "language": s.language, "tags": tags}
            )

        # Two-hop recall, the headline case: Dallas -> (Texas) -> Austin, in every language.
        for lang in langs:
            add(
                f"two_hop_{dallas.lower()}_{lang}",
                self._make("two_hop", lang, 0, texas, dallas),
                "two_hop" if lang == "en" else "language",
                california,
                f"two_hop_{dallas.lower()}",
            )
        # The counterfactual source for the state swap: Fresno -> (California) -> Sacramento.
        add(f"two_hop_{fresno.lower()}_en", self._make("two_hop", "en", 0, california, fresno), "two_hop", texas, None)
        # One-hop facts.
        add(
            f"capital_{texas.name.lower()}_en",
            self._make("state_capital", "en", 0, texas, texas.capital),
            "one_hop",
            california,
            f"capital_{texas.name.lower()}",
        )
        add(f"state_{dallas.lower()}_en", self._make("city_state", "en", 0, texas, dallas), "one_hop", None, None)
        # Held-out two-hop (never trained as a two-hop sentence).
        if held:
            st = self.state_of(held[0])
            add(
                f"two_hop_heldout_{held[0].lower()}_en",
                self._make("two_hop", "en", 0, st, held[0]),
                "two_hop_heldout",
                None,
                None,
            )
        # Language prompts: the same one-hop facts in the toy language.
        if "toy" in langs:
            add(
                f"capital_{texas.name.lower()}_toy",
                self._make("state_capital", "toy", 0, texas, texas.capital),
                "language",
                california,
                f"capital_{texas.name.lower()}",
            )
            add(
                f"state_{dallas.lower()}_toy", self._make("city_state", "toy", 0, texas, dallas), "language", None, None
            )
        return out


def make_world(cfg: WorldConfig | None = None) -> World:
    """Build the world for ``cfg``: a prefix of the fixed state table and a seeded held-out split."""
    cfg = cfg or WorldConfig()
    rng = random.Random(f"world:{cfg.seed}")
    states = [State(name, cap, cities[: cfg.cities_per_state]) for name, cap, cities in STATE_TABLE[: cfg.n_states]]
    held_out: dict[str, tuple[str, ...]] = {}
    for s in states:
        candidates = [c for c in s.cities if c not in cfg.pinned_trained]
        k = min(cfg.held_out_per_state, len(candidates))
        held_out[s.name] = tuple(sorted(rng.sample(candidates, k), key=s.cities.index))
    world = World(
        config=cfg,
        states=states,
        held_out=held_out,
        languages=LANGUAGES[: cfg.languages],
        towns=TOWN_NAMES[: cfg.towns],
        stateless=STATELESS_NAMES[: cfg.stateless],
    )
    names = [world.spell(n, lang) for lang in world.languages for s in states for n in (s.name, s.capital)]
    names += [c for s in states for c in s.cities] + list(world.towns) + list(world.stateless)
    if world.stateless:
        names += [world.spell(n, lang) for lang in world.languages for n in (NO_STATE, NO_CAPITAL)]
    template_words = {
        w for lang in world.languages for k in SENTENCE_KINDS for t in world.template_table(lang)[k] for w in t.split()
    }
    if len(names) != len(set(names)) or set(names) & template_words:  # pragma: no cover - fixed tables
        raise ValueError("names collide with each other or with template words")
    return world
