"""Population detection: does a latent's concept predict *where in the dataset* the latent fires?

The contrastive scores (:mod:`msae.score.quality`) only look at a latent's top examples: they ask
whether the concept describes those better than random examples. That cannot tell a selective
latent from one whose strongest examples merely *share* something common — a latent firing on a
few background patches, or on one word among many others, gets a concept that describes its top
five perfectly. Measured on the calibration world, most false "visual" labels were such latents.

Detection, as in Delphi-style auto-interpretability, judges the concept on a population instead:
a seeded subset of the dataset's samples (``scores.population_samples``), each *item* marked
positive when the latent fires strongly on it (≥ ``scores.population_strong_fraction`` × its largest
activation over the population, in that modality). The judge is the embedding model, not an LLM:

* visual items are the samples' images — score ``cos(concept, whole image)``; positive when the
  latent fires strongly on any of the sample's image tokens;
* textual items are the eligible text tokens (not template ones, unless
  ``latents.text_include_template``) plus each sample's answer position (the token right before the
  answer, where the VLM computes it; :mod:`msae.latents.answer_position`, from token roles only,
  its word :data:`~msae.latents.answer_position.ANSWER_POSITION`) —
  score ``cos(concept, the token's word)``; positive when the latent fires strongly on that token.
  That is the ground truth's text population, so the gate judges text on the tokens the ground
  truth does.

The score is the AUROC of the judge's similarity for positives against the rest (ties half), with
the number of positives beside it — *selectivity*: are the latent's strong items the concept's? Text
also gets *coverage*, the other direction (``textual_population_coverage``): the AUROC of the
latent's activation for the tokens whose word *is* the concept (one of its words, for a phrase)
against every other token, with their number (``textual_population_matches``). A latent that fires
on every "one", weakly, and hardest on other words has low selectivity but high coverage; the
ground truth grounds such a latent by its AUROC. And text gets *precision*
(``textual_population_precision``): the share of the latent's strong tokens whose word is the
concept (one of its words) — selectivity by exact match instead of the judge's similarity, which
for a name like ``<answer position>`` or a size word the embedding model separates poorly from its
neighbours. Images have no word to match, so neither coverage nor precision.
The label rule (:mod:`msae.score.classify`) trusts a detection only with at least
``scores.population_min_positives`` positives (matches, for coverage). The random baseline is the same
AUROC for a random *other* candidate concept of the partition: it shows how much of the score is the
concept and how much the population.

Concept selection (``scores.select_by_detection``, :func:`select_by_detection`)
An explainer's answer often has several readings: the combining rule's qualifying n-grams
("small", "orange cross", "small orange cross", …; ``proposals.parquet``'s ``*_candidates``) and the
shorter phrases inside the concept itself. As in explain-simulate-score auto-interpretability,
where the explanation that best predicts activations is kept, each reading is scored by its
population detection and the *simplest* one within ``scores.selection_tolerance`` of the best
AUROC is kept (fewest words; ties: the explainer's order, its own concept first). The explainer's
concept stays in ``*_concept_proposed``. It never invents a concept: no answer, no candidate.
With ``scores.selection_population_words`` a textual answer's readings also include the latent's
most frequent words among its strong tokens (:func:`strong_words`): a latent whose few largest
activations sit on the answer position, so that every top text peaks there, while most of its
strong ones sit on "and", can then be named "and". With ``scores.selection_evidence_words`` they also
include the words the latent is active on in its top texts (:func:`evidence_words`: the evidence the
explainer saw). With ``scores.textual_selection_measure: coverage`` textual readings are ranked by
their coverage (the latent's activation predicting where the word occurs) instead of the judge's
similarity: a latent that fires on most "and" tokens, weakly, and hardest elsewhere is then named by
the word it covers.

Nothing here reads annotations or an explainer's answer other than the concept texts themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from msae.explain.combine import DEFAULT_STOP_WORDS, content_ngrams
from msae.latents.answer_position import answer_position_rows, display_words
from msae.score.ground_truth import average_ranks
from msae.score.quality import candidate_concepts, normalise_concept

POPULATION_REVISION = 5
"""Bump when these scores or the selection compute other values (their cache key holds it).
3: textual detection ranked by word (exact ties; per-token float noise gave differences ≤ 4e-5).
4: answer positions read as their display name, not as their ":" piece.
5: textual_population_precision."""
POPULATION_COLUMNS = ("visual_population_auroc", "visual_population_positives", "visual_population_random",
                      "textual_population_auroc", "textual_population_positives", "textual_population_random",
                      "textual_population_coverage", "textual_population_matches", "textual_population_precision")


@dataclass(frozen=True)
class SparseColumns:
    """A modality's activations over its items, kept sparse and grouped by latent (TopK codes are
    sparse, so this stays small at 131k latents): item ``items[starts[w]:starts[w+1]]`` has
    activation ``values[...]`` for latent ``w``; every other item is 0."""

    n_items: int
    starts: np.ndarray
    items: np.ndarray
    values: np.ndarray

    @classmethod
    def from_triplets(cls, n_items: int, width: int, items: np.ndarray, latents: np.ndarray,
                      values: np.ndarray) -> SparseColumns:
        """(item, latent, value) triplets; repeated (item, latent) pairs keep their maximum."""
        keep = values > 0
        items, latents, values = items[keep].astype(np.int64), latents[keep].astype(np.int64), values[keep]
        order = np.lexsort((-values, items, latents))  # by latent, item; the largest value first
        items, latents, values = items[order], latents[order], values[order]
        first = np.ones(len(items), bool)
        first[1:] = (items[1:] != items[:-1]) | (latents[1:] != latents[:-1])
        items, latents, values = items[first], latents[first], values[first].astype(np.float32)
        starts = np.searchsorted(latents, np.arange(width + 1)).astype(np.int64)
        return cls(n_items, starts, items, values)

    def column(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.starts[latent], self.starts[latent + 1]
        return self.items[a:b], self.values[a:b]

    def strong(self, latent: int, fraction: float) -> np.ndarray:
        """Items where the latent's activation ≥ ``fraction`` × its largest one (and > 0)."""
        items, values = self.column(latent)
        if not len(values):
            return items
        return items[values >= fraction * values.max()]


@dataclass(frozen=True)
class Population:
    """The detection population of one layer × width: activations plus what the judge sees."""

    images: SparseColumns
    image_refs: list[str]
    """Per visual item (a sample with an image): its image path or URL."""
    texts: SparseColumns
    vocab: list[str]
    """The textual items' distinct words (as displayed, stripped, lower-cased), in first-seen order."""
    word_ids: np.ndarray
    """Per textual item (an eligible text token or an answer position): its word's index in ``vocab``."""

    @classmethod
    def with_words(cls, images: SparseColumns, image_refs: list[str], texts: SparseColumns,
                   words: Sequence[str]) -> Population:
        where: dict[str, int] = {}
        ids = np.array([where.setdefault(w, len(where)) for w in words], dtype=np.int64)
        return cls(images, image_refs, texts, list(where), ids)


def rank_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``scores`` for the boolean ``positive`` against the rest, ties counted half (NaN
    when either side is empty)."""
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_auroc(values: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC when items come in groups sharing one score: ``values[g]`` is group g's score,
    ``positives[g]`` / ``negatives[g]`` how many of its items are positive / negative (ties, within
    a group or between groups of equal score, count half). O(groups log groups), so a population
    of 10⁵ tokens over a vocabulary of 10³ words is ranked by its words, not its tokens."""
    pos_total, neg_total = float(positives.sum()), float(negatives.sum())
    if pos_total == 0 or neg_total == 0:
        return float("nan")
    uniq, inverse = np.unique(np.asarray(values, np.float64), return_inverse=True)
    pos = np.bincount(inverse, weights=positives, minlength=len(uniq))
    neg = np.bincount(inverse, weights=negatives, minlength=len(uniq))
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos_total * neg_total))


def detection(similarity: np.ndarray, strong_items: np.ndarray) -> tuple[float, int]:
    """(AUROC, number of positives) of the judge's similarity per item for the strong items."""
    positive = np.zeros(len(similarity), bool)
    positive[strong_items] = True
    return rank_auroc(similarity, positive), int(positive.sum())


def word_detection(vocab_similarity: np.ndarray, word_ids: np.ndarray, word_counts: np.ndarray,
                   strong_items: np.ndarray) -> tuple[float, int]:
    """:func:`detection` for textual items, whose similarity is their word's: ranked by word."""
    pos = np.bincount(word_ids[strong_items], minlength=len(word_counts)).astype(np.float64)
    return grouped_auroc(vocab_similarity, pos, word_counts - pos), len(strong_items)


def concept_words_mask(vocab: Sequence[str], concept: str) -> np.ndarray:
    """bool [vocab]: the word shows the concept — is the concept itself or one of a phrase's words."""
    wanted = set([concept, *concept.split()])
    return np.array([w in wanted for w in vocab], dtype=bool)


def word_precision(vocab: Sequence[str], word_ids: np.ndarray, strong_items: np.ndarray,
                   concept: str) -> float | None:
    """Share of the strong textual items whose word shows the concept (None without strong items)."""
    if not len(strong_items):
        return None
    return float(concept_words_mask(vocab, concept)[word_ids[strong_items]].mean())


def coverage(texts: SparseColumns, latent: int, vocab: Sequence[str], word_ids: np.ndarray,
             concept: str) -> tuple[float | None, int]:
    """(AUROC of the latent's activation for the tokens showing the concept — the word itself, or
    any of a phrase's words — against all other tokens, their number); None without both sides.
    Only the latent's firing tokens have their own activation; all the others share 0."""
    word_match = concept_words_mask(vocab, concept)
    match = word_match[word_ids] if len(word_ids) else np.zeros(0, bool)
    n_match = int(match.sum())
    items, values = texts.column(latent)
    firing_match = match[items]
    zero_pos = n_match - int(firing_match.sum())
    zero_neg = (texts.n_items - n_match) - int((~firing_match).sum())
    score = grouped_auroc(np.concatenate([values.astype(np.float64), [0.0]]),
                          np.concatenate([firing_match.astype(np.float64), [zero_pos]]),
                          np.concatenate([(~firing_match).astype(np.float64), [zero_neg]]))
    return (None if np.isnan(score) else score), n_match


def population_scores(proposals: pl.DataFrame, population: Population, image_emb: np.ndarray,
                      word_emb: np.ndarray, concept_image: dict[str, np.ndarray],
                      concept_text: dict[str, np.ndarray], strong_fraction: float, seed: int) -> pl.DataFrame:
    """:data:`POPULATION_COLUMNS` per proposal row (keys ``latent``, ``prompting``); pure.

    ``image_emb`` [visual items, D] and ``word_emb`` [``population.vocab``, D'] are L2-normalised;
    ``concept_image`` / ``concept_text`` map each normalised concept to its image-text / text
    embedding. The random baseline's concept is drawn per latent (seeded by ``(seed, latent)``) from
    the other candidates of the same kind, so both prompting modes share it.
    """
    v_cands = candidate_concepts(proposals["visual_concept"].to_list())
    t_cands = candidate_concepts(proposals["textual_concept"].to_list())
    counts = np.bincount(population.word_ids, minlength=len(population.vocab)).astype(np.float64)
    v_sim = {c: image_emb @ concept_image[c] for c in v_cands} if len(image_emb) else {}
    t_sim = {c: word_emb @ concept_text[c] for c in t_cands} if len(word_emb) else {}

    def judged(kind: str, sim: np.ndarray, strong: np.ndarray) -> tuple[float, int]:
        return detection(sim, strong) if kind == "visual" else word_detection(sim, population.word_ids, counts, strong)

    rows = []
    for r in proposals.iter_rows(named=True):
        lat = int(r["latent"])
        rng = np.random.default_rng([seed, lat, 3])
        out: dict[str, Any] = {"latent": r["latent"], "prompting": r["prompting"]}
        concept = {k: normalise_concept(r[f"{k}_concept"]) if r[f"{k}_concept"] else None for k in ("visual", "textual")}
        strong = {"visual": population.images.strong(lat, strong_fraction),
                  "textual": population.texts.strong(lat, strong_fraction)}
        for kind, sims, cands in (("visual", v_sim, v_cands), ("textual", t_sim, t_cands)):
            c = concept[kind]
            values: tuple[float | None, int | None, float | None] = (None, None, None)
            if c is not None and c in sims:
                score, n = judged(kind, sims[c], strong[kind])
                others = [o for o in cands if o != c]
                rand = (judged(kind, sims[others[rng.integers(len(others))]], strong[kind])[0] if others
                        else float("nan"))
                values = (None if np.isnan(score) else score, n, None if np.isnan(rand) else rand)
            out |= dict(zip((f"{kind}_population_auroc", f"{kind}_population_positives",
                             f"{kind}_population_random"), values))
        c = concept["textual"]
        with_words = c is not None and bool(population.vocab)
        out["textual_population_coverage"], out["textual_population_matches"] = (
            coverage(population.texts, lat, population.vocab, population.word_ids, c) if with_words else (None, None))
        out["textual_population_precision"] = (
            word_precision(population.vocab, population.word_ids, strong["textual"], c) if with_words else None)
        rows.append(out)
    schema = {"latent": proposals.schema["latent"], "prompting": pl.Utf8,
              **{c: (pl.Int64 if c.endswith(("positives", "matches")) else pl.Float64) for c in POPULATION_COLUMNS}}
    return pl.DataFrame(rows, schema=schema)


def strong_words(population: Population, latent: int, fraction: float, n: int) -> list[str]:
    """The ``n`` most frequent words among the textual items the latent fires strongly on (ties: the
    word seen first in the population); pure."""
    strong = population.texts.strong(latent, fraction)
    if n <= 0 or not len(strong):
        return []
    counts = np.bincount(population.word_ids[strong], minlength=len(population.vocab))
    order = np.argsort(-counts, kind="stable")[:n]
    return [population.vocab[i] for i in order if counts[i] > 0]


def evidence_words(texts: Sequence[Any], n_texts: int) -> list[str]:
    """The distinct words (as displayed, stripped, lower-cased) the latent is active on in its first
    ``n_texts`` top texts (:class:`msae.latents.evidence.TextExample`), by decreasing activation:
    the words of the evidence the explainer was shown; pure."""
    best: dict[str, float] = {}
    for t in texts[:n_texts]:
        for word, act in zip(t.display(), np.asarray(t.activations, np.float64)):
            w = word.strip().lower()
            if act > 0 and w and act > best.get(w, 0.0):
                best[w] = float(act)
    return sorted(best, key=lambda w: -best[w])


def readings(concept: str | None, candidates: Sequence[str] | None, kind: str) -> list[str]:
    """The normalised readings of one answer: its concept, the explainer's candidates, then the
    content phrases inside the concept (visual: without function words), each once."""
    if not concept:
        return []
    stop = DEFAULT_STOP_WORDS if kind == "visual" else ()
    c = normalise_concept(concept)
    inner = [" ".join(g) for g in content_ngrams(c, stop, max(1, len(c.split())))]
    return list(dict.fromkeys([c, *(normalise_concept(x) for x in (candidates or []) if x), *inner]))


def choose_reading(options: Sequence[str], aurocs: Sequence[float], tolerance: float) -> str:
    """The simplest option within ``tolerance`` of the best AUROC (NaN never counts); the first
    option when none has one."""
    scores = np.array(aurocs, dtype=np.float64)
    if not len(options) or np.isnan(scores).all():
        return options[0]
    best = np.nanmax(scores)
    close = [i for i, s in enumerate(scores) if not np.isnan(s) and s >= best - tolerance - 1e-12]
    return options[min(close, key=lambda i: (len(options[i].split()), i))]


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def select_by_detection(proposals: pl.DataFrame, population: Population, image_emb: np.ndarray,
                        word_emb: np.ndarray, concept_image: dict[str, np.ndarray],
                        concept_text: dict[str, np.ndarray], strong_fraction: float,
                        tolerance: float, population_words: int = 0,
                        textual_measure: str = "similarity",
                        top_text_words: Mapping[int, Sequence[str]] | None = None) -> pl.DataFrame:
    """The proposals with each concept replaced by its best-detecting reading (module doc) and the
    explainer's own kept as ``visual_concept_proposed`` / ``textual_concept_proposed``; pure.
    ``population_words``: textual readings also include that many :func:`strong_words`.
    ``textual_measure``: ``"similarity"`` ranks textual readings by the judge's detection AUROC,
    ``"coverage"`` by :func:`coverage` (``scores.textual_selection_measure``).
    ``top_text_words``: per latent, words also offered as textual readings (:func:`evidence_words`,
    ``scores.selection_evidence_words``)."""
    if textual_measure not in ("similarity", "coverage"):
        raise ValueError(f"textual_measure must be 'similarity' or 'coverage', not {textual_measure!r}")
    out: dict[str, list[str | None]] = {"visual_concept": [], "textual_concept": []}
    counts = np.bincount(population.word_ids, minlength=len(population.vocab)).astype(np.float64)
    for r in proposals.iter_rows(named=True):
        lat = int(r["latent"])
        for kind, emb, table, cols in (("visual", image_emb, concept_image, population.images),
                                       ("textual", word_emb, concept_text, population.texts)):
            options = readings(r[f"{kind}_concept"], r.get(f"{kind}_candidates"), kind)
            if kind == "textual" and options:
                options = list(dict.fromkeys([*options, *strong_words(population, lat, strong_fraction,
                                                                       population_words),
                                              *((top_text_words or {}).get(lat) or [])]))
            if len(options) < 2 or not len(emb):
                out[f"{kind}_concept"].append(r[f"{kind}_concept"])
                continue
            strong = cols.strong(lat, strong_fraction)
            if kind == "textual" and textual_measure == "coverage":
                aucs = [_nan(coverage(population.texts, lat, population.vocab, population.word_ids, o)[0])
                        for o in options]
            else:
                aucs = [(detection(emb @ table[o], strong) if kind == "visual" else
                         word_detection(emb @ table[o], population.word_ids, counts, strong))[0] for o in options]
            out[f"{kind}_concept"].append(choose_reading(options, aucs, tolerance))
    return proposals.with_columns(
        pl.col("visual_concept").alias("visual_concept_proposed"),
        pl.col("textual_concept").alias("textual_concept_proposed"),
    ).with_columns(pl.Series("visual_concept", out["visual_concept"], dtype=pl.Utf8),
                   pl.Series("textual_concept", out["textual_concept"], dtype=pl.Utf8))


# --- I/O edge: the population of a layer × width from the store ---------------------------------
def load_population(store: Any, layer: int, width: int | str, n_samples: int, seed: int,
                    include_template: bool, device: str = "cpu", batch_rows: int = 16384,
                    max_rows: int = 8192) -> Population:
    """Encode a seeded subset of ``n_samples`` samples with the layer × width SAE (every image token
    and every eligible text token; rows with NaN/inf activations count as not firing)."""
    from msae.latents.evidence import read_table, resolve_image
    from msae.latents.render import display_tokens
    from msae.latents.stats import encode_rows
    from msae.sae.formats import load_sae
    from msae.sae.stage import open_layer

    samples = read_table(store, store.SAMPLES, ["image"])
    rng = np.random.default_rng([seed, 4])
    chosen = np.sort(rng.choice(samples.height, size=min(n_samples, samples.height), replace=False))
    tokens = read_table(store, store.TOKENS, ["sample_index", "sample_id", "position", "token", "modality", "role"])
    array = open_layer(store, layer)
    if tokens.height != array.shape[0]:
        raise ValueError(f"tokens.parquet has {tokens.height} rows but layer {layer}'s activations have "
                         f"{array.shape[0]}: they come from different runs")
    in_subset = np.isin(tokens["sample_index"].to_numpy(), chosen)
    is_image = (tokens["modality"] == "image").fill_null(False).to_numpy() & in_subset
    is_text = (tokens["modality"] == "text").fill_null(False).to_numpy() & in_subset
    if not include_template:
        is_text &= (tokens["role"].fill_null("") != "template").to_numpy()
    is_answer = answer_position_rows(tokens)
    is_text |= is_answer & in_subset
    images = samples["image"].to_list()
    with_image = [int(i) for i in chosen if images[i]]
    item_of_sample = np.full(samples.height, -1, np.int64)
    item_of_sample[with_image] = np.arange(len(with_image))
    sample_index = tokens["sample_index"].to_numpy()
    text_rows = np.flatnonzero(is_text)
    text_item = np.full(len(tokens), -1, np.int64)
    text_item[text_rows] = np.arange(len(text_rows))

    sae = load_sae(store.url(store.sae_name(layer, width)), device=device).float().eval()
    keep = is_image | is_text
    trip: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for r0 in range(0, len(tokens), batch_rows):
        r1 = min(r0 + batch_rows, len(tokens))
        local = np.flatnonzero(keep[r0:r1])
        if not len(local):
            continue
        x = np.asarray(array[r0:r1], dtype=np.float32)[local]
        finite = np.isfinite(x).all(axis=1)
        values, indices = encode_rows(sae, np.where(finite[:, None], x, 0.0), device, max_rows)
        values = values.cpu().numpy() * finite[:, None]
        indices = indices.cpu().numpy()
        rows = r0 + local
        for kind, mask, item in (("image", is_image[rows], None), ("text", is_text[rows], text_item[rows])):
            if not mask.any():
                continue
            owner = item_of_sample[sample_index[rows[mask]]] if item is None else item[mask]
            ok = owner >= 0
            k = indices.shape[1]
            trip[kind].append(np.stack([np.repeat(owner[ok], k), indices[mask][ok].ravel(),
                                        values[mask][ok].ravel()]))

    def columns(kind: str, n_items: int) -> SparseColumns:
        t = np.concatenate(trip[kind], axis=1) if trip[kind] else np.zeros((3, 0))
        return SparseColumns.from_triplets(n_items, sae.num_latents, t[0].astype(np.int64), t[1].astype(np.int64),
                                           t[2].astype(np.float32))

    pieces = tokens["token"].fill_null("").to_list()
    words = [w.strip().lower() for w in display_words(display_tokens([pieces[r] for r in text_rows]),
                                                       is_answer[text_rows])]
    return Population.with_words(columns("image", len(with_image)),
                                 [resolve_image(store, images[s]) for s in with_image], columns("text", len(text_rows)),
                                 words)


def score_population(cfg: Any, store: Any, layer: int, width: int | str, proposals: pl.DataFrame,
                     image_text: Sequence[Any], text_embedder: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(proposals — with concepts chosen by :func:`select_by_detection` when
    ``scores.select_by_detection`` —, :func:`population_scores` of their concepts), with the first
    image-text embedder as the visual judge and the text embedder as the textual one."""
    from msae.data.images import ImageLimits, load_image_rgb

    s = cfg.scores
    from msae.embed.embedders import resolve_device

    pop = load_population(store, layer, width, s.population_samples, s.seed, cfg.latents.text_include_template,
                          device=str(resolve_device(cfg.embedders.device)))
    judge = image_text[0]
    limits = ImageLimits.from_config(cfg.dataset)
    chunk = 256
    image_emb = np.zeros((0, 1))
    if pop.image_refs:
        image_emb = np.concatenate([judge.embed_images([load_image_rgb(p, limits=limits)
                                                        for p in pop.image_refs[i: i + chunk]])
                                    for i in range(0, len(pop.image_refs), chunk)])
    word_emb = text_embedder.embed_texts(pop.vocab) if pop.vocab else np.zeros((0, 1))
    top_words: dict[int, list[str]] = {}
    if s.select_by_detection and s.selection_evidence_words:
        from msae.latents.evidence import load_evidence

        with_text = proposals.filter(pl.col("textual_concept").is_not_null())["latent"].unique().to_list()
        evidence = load_evidence(store, layer, int(width), sorted(int(x) for x in with_text))
        top_words = {lat: evidence_words(ev.texts, cfg.explainer.examples) for lat, ev in evidence.items()}

    def all_readings(kind: str) -> list[str]:
        cands = proposals[f"{kind}_candidates"].to_list() if f"{kind}_candidates" in proposals.columns else \
            [None] * proposals.height
        words = s.selection_population_words if kind == "textual" and s.select_by_detection else 0
        return list(dict.fromkeys(
            x for lat, c, k in zip(proposals["latent"].to_list(), proposals[f"{kind}_concept"].to_list(), cands)
            for x in [*readings(c, k, kind),
                      *(strong_words(pop, int(lat), s.population_strong_fraction, words) if c else []),
                      *(top_words.get(int(lat), []) if c and kind == "textual" else [])]))

    v, t = all_readings("visual"), all_readings("textual")
    concept_image = dict(zip(v, judge.embed_texts(v))) if v else {}
    concept_text = dict(zip(t, text_embedder.embed_texts(t))) if t else {}
    chosen = proposals
    if s.select_by_detection:
        chosen = select_by_detection(proposals, pop, image_emb, word_emb, concept_image, concept_text,
                                     s.population_strong_fraction, s.selection_tolerance,
                                     s.selection_population_words, s.textual_selection_measure, top_words)
    return chosen, population_scores(chosen, pop, image_emb, word_emb, concept_image, concept_text,
                                     s.population_strong_fraction, s.seed)


__all__ = ["POPULATION_COLUMNS", "Population", "SparseColumns", "choose_reading", "concept_words_mask", "coverage",
           "detection", "evidence_words", "word_precision",
           "grouped_auroc", "load_population", "word_detection",
           "population_scores", "rank_auroc", "readings", "score_population", "select_by_detection", "strong_words"]
