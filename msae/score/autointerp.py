"""LLM-judged detection and fuzzing scores of textual concepts (Paulo et al. 2024, "Delphi" style).

The method scores explanations by asking a judge LLM, through any OpenAI-compatible server
(``scores.judge = "openai"``), two questions per latent:

* **Detection** - given the latent's textual concept and a shuffled list of plain texts (no
  marks), which texts make the latent fire? Activating texts are the latent's own top texts;
  non-activating ones are top texts of *other* latents whose sample is not among this latent's
  top texts (nor shows the same text). Scores: accuracy, balanced accuracy and F1 of the judge's
  0/1 answers against the truth.
* **Fuzzing** - given the concept and the latent's activating texts with some tokens in
  ``<< >>``, are the marked tokens the ones the concept describes? For half of the texts the
  marks are on the truly active tokens (:func:`msae.latents.render.mark_active`); for the other
  half they are on randomly chosen inactive tokens, as many as were active. Score: balanced
  accuracy (correct vs wrong marking).

Choosing the activating examples: Delphi samples them from activation deciles over the whole
dataset. The store keeps only each latent's top-K texts (``latents.top_k``), so here the
"quantiles" are **ranks within the top-K**: when more texts are needed than exist, all K are used;
otherwise evenly spaced ranks from the best to the K-th are taken (both ends included). These
are the strongest activations only, and usually the very examples the explainer saw, so the scores
are optimistic compared with Delphi's held-out, whole-range sampling; compare latents and
explainers with each other, not with the paper's absolute numbers.

Per prompt (``scores.judge_examples`` = N): detection shows min(K, N // 2) activating and up to
N - N // 2 non-activating texts; fuzzing shows min(K, N) activating texts, floor(half) of them
wrongly marked. Texts longer than ``2 * context_tokens + 1`` tokens are cut to a window around
their own peak (for negatives: the peak of the latent they came from, so cutting does not tell the
two kinds apart), with "…" where cut.

Randomness (which negatives, the order, which texts get wrong marks and where) comes from a
generator seeded by ``(scores.seed, latent, task)``: results do not depend on concurrency or on
which other latents are scored in the same call. The judge runs at temperature 0.

HTTP, timeouts, retries with back-off, the bounded concurrency and key handling are those of
:class:`msae.explain.openai_backend.OpenAIExplainer` (``explainer.timeout_s``, ``max_retries``,
``backoff_s``, ``concurrency``, ``api_key_env``); see :class:`JudgeClient` for how. A judge that
fails or answers unreadably gives that latent's score None with a status; nothing raises.

Statuses (``judge_status``): ``ok`` when both tasks were scored, else ``detection:<s>,fuzzing:<s>``
with ``<s>`` one of ok, no_concept, no_examples, no_negatives, too_few_examples, unparsed,
wrong_length, error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from string import Template

import numpy as np
import polars as pl

from msae.config import ExplainerConfig, MsaeConfig
from msae.explain.openai_backend import OpenAIExplainer
from msae.explain.prompts import parse_sections, prompt_version
from msae.latents.evidence import LatentEvidence, TextExample
from msae.latents.render import display_tokens, join_tokens, mark_active

log = logging.getLogger(__name__)

TASKS = ("detection", "fuzzing")
JUDGE_PLACEHOLDERS = ("concept", "n", "index", "text")
CONTEXT_TOKENS = 32
"""Default tokens kept each side of a text's peak (Delphi shows 32-token contexts)."""
MIN_MAX_TOKENS = 256
"""The judge's answer cap is at least this (a list of N digits, plus any preamble)."""

COLUMNS: dict[str, pl.DataType] = {
    "latent": pl.Int64, "detection_accuracy": pl.Float64, "detection_balanced": pl.Float64,
    "detection_f1": pl.Float64, "fuzzing_balanced": pl.Float64, "judge_status": pl.Utf8, "judge": pl.Utf8,
    "judge_prompt_version": pl.Utf8,
}

_TASK_SEED = {"detection": 1, "fuzzing": 2}


# --- templates --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JudgeTemplate:
    """One judge prompt file: [[instructions]] ($concept, $n), [[example]] ($index, $text), [[closing]] ($n)."""

    name: str
    text: str
    instructions: str
    example: str
    closing: str

    @property
    def version(self) -> str:
        return prompt_version(self.text)

    def render(self, concept: str, texts: Sequence[str]) -> str:
        fill = {"concept": concept, "n": len(texts), "index": 0, "text": ""}
        lines = [Template(self.example).substitute(fill, index=i, text=t) for i, t in enumerate(texts, start=1)]
        return "\n\n".join([Template(self.instructions).substitute(fill), "\n".join(lines),
                            Template(self.closing).substitute(fill)])


def parse_judge_template(text: str, name: str) -> JudgeTemplate:
    text = text.replace("\r\n", "\n")
    return JudgeTemplate(name=name, text=text, **parse_sections(text, name, JUDGE_PLACEHOLDERS))


def load_judge_templates() -> dict[str, JudgeTemplate]:
    """The built-in prompts, msae/score/templates/{detection,fuzzing}.txt."""
    folder = resources.files("msae.score").joinpath("templates")
    return {task: parse_judge_template(folder.joinpath(f"{task}.txt").read_text(encoding="utf-8"), f"{task}.txt")
            for task in TASKS}


def judge_prompt_version(templates: dict[str, JudgeTemplate]) -> str:
    return prompt_version("\n".join(templates[t].text for t in TASKS))


# --- parsing the judge's answer -----------------------------------------------------------------------
_LABELS = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0, "correct": 1, "incorrect": 0,
           "1.0": 1, "0.0": 0}
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_LINE = re.compile(
    r"^[\s>*_\-#]*(?:example|text|item|no\.?|#)?\s*\(?(\d+)\)?[\s*_]*[:.)=\-\u2013\u2014]+[\s*_\"']*"
    r"(yes|no|true|false|incorrect|correct|1|0)\b", re.IGNORECASE | re.MULTILINE)
_WORD = r"(?:1|0|yes|no|true|false)"
_RUN = re.compile(rf"(?<![\w.]){_WORD}(?:\s*[,;]?\s*{_WORD})+(?![\w.])", re.IGNORECASE)


def _label(item: object) -> int | None:
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, (int, float)) and item in (0, 1):
        return int(item)
    if isinstance(item, str):
        return _LABELS.get(item.strip().strip("\"'").strip().lower())
    return None


def parse_judgement(raw: str, n: int) -> tuple[list[int] | None, str]:
    """The judge's n 0/1 answers from free text: (labels, 'ok') or (None, 'wrong_length' | 'unparsed').

    Accepted, in this order: a JSON-style list ("[1, 0, 1]", also with yes/no/true/false, the last
    list of length n wins); numbered lines ("Text 3: yes", "3. 0", "**Example 3:** no") covering
    1..n exactly; a bare run of labels ("1, 0, 1" or "1 0 1"). Reasoning in <think> tags is
    ignored. A readable answer of another length is 'wrong_length'.
    """
    text = _THINK.sub(" ", raw or "")
    wrong = False
    lists = []
    for m in _LIST.finditer(text):
        items = [s for s in re.split(r"[,;\s]+", m.group(1).strip()) if s]
        labels = [_label(s) for s in items]
        if items and all(v is not None for v in labels):
            lists.append(labels)
    for labels in reversed(lists):
        if len(labels) == n:
            return labels, "ok"  # type: ignore[return-value]
    wrong |= bool(lists)
    numbered: dict[int, int] = {}
    conflict = False
    for m in _LINE.finditer(text):
        index, value = int(m.group(1)), _LABELS[m.group(2).lower()]
        conflict |= numbered.get(index, value) != value
        numbered[index] = value
    if numbered:
        if not conflict and sorted(numbered) == list(range(1, n + 1)):
            return [numbered[i] for i in range(1, n + 1)], "ok"
        wrong = True
    runs = [[_LABELS[w.lower()] for w in re.findall(_WORD, m.group(0), re.IGNORECASE)] for m in _RUN.finditer(text)]
    for labels in reversed(runs):
        if len(labels) == n:
            return labels, "ok"
    wrong |= bool(runs)
    return None, "wrong_length" if wrong else "unparsed"


# --- metrics --------------------------------------------------------------------------------------------
def binary_scores(truth: Sequence[int], pred: Sequence[int]) -> dict[str, float | None]:
    """accuracy, balanced accuracy (mean of the two recalls; None unless both classes occur) and F1 of class 1."""
    y, p = np.asarray(truth, dtype=bool), np.asarray(pred, dtype=bool)
    if y.size == 0 or y.shape != p.shape:
        return {"accuracy": None, "balanced": None, "f1": None}
    tp, fn = int((y & p).sum()), int((y & ~p).sum())
    tn, fp = int((~y & ~p).sum()), int((~y & p).sum())
    balanced = 0.5 * (tp / (tp + fn) + tn / (tn + fp)) if (tp + fn) and (tn + fp) else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return {"accuracy": (tp + tn) / y.size, "balanced": balanced, "f1": f1}


# --- building the examples --------------------------------------------------------------------------------
def spread_ranks(k: int, m: int) -> list[int]:
    """m ranks out of 0..k-1, evenly spaced with both ends (all k when m >= k)."""
    if m >= k:
        return list(range(k))
    if m <= 0:
        return []
    if m == 1:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(0, k - 1, m)})


def _view(t: TextExample, context: int) -> tuple[list[str], np.ndarray, str, str]:
    """(pieces, activations, prefix, suffix) of the text cut to ±context tokens around its peak."""
    pieces, acts = list(t.pieces), np.asarray(t.activations, dtype=np.float32)
    n = len(pieces)
    if n <= 2 * context + 1:
        return pieces, acts, "", ""
    peak = t.peak if 0 <= t.peak < n else int(np.argmax(acts))
    lo, hi = max(0, peak - context), min(n, peak + context + 1)
    cut = join_tokens(display_tokens(pieces[lo:hi])).strip()
    if cut != join_tokens(display_tokens(pieces)[lo:hi]).strip():  # the cut would change how the pieces read
        return pieces, acts, "", ""
    return pieces[lo:hi], acts[lo:hi], "… " if lo > 0 else "", " …" if hi < n else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def plain_text(t: TextExample, context: int = CONTEXT_TOKENS) -> str:
    """The detection view: the (cut) text without marks, on one line."""
    pieces, _, pre, post = _view(t, context)
    return _one_line(pre + join_tokens(display_tokens(pieces)).strip() + post)


def marked_text(t: TextExample, rng: np.random.Generator | None = None,
                context: int = CONTEXT_TOKENS) -> str | None:
    """The fuzzing view: << >> on the active tokens (rng None) or on as many random inactive,
    non-blank tokens (rng given); None when that is impossible (no active or no inactive token)."""
    pieces, acts, pre, post = _view(t, context)
    active = acts > 0
    if not active.any():
        return None
    if rng is None:
        marks = active
    else:
        shown = display_tokens(pieces)
        pool = [i for i in range(len(pieces)) if not active[i] and shown[i].strip()]
        if not pool:
            return None
        chosen = rng.choice(pool, size=min(int(active.sum()), len(pool)), replace=False)
        marks = np.zeros(len(pieces), dtype=bool)
        marks[chosen] = True
    return _one_line(pre + mark_active(pieces, marks.astype(np.float32)) + post)


@dataclass(frozen=True)
class Job:
    """One prompt to the judge: the texts in the order shown and the truth for each."""

    latent: int
    task: str
    texts: tuple[str, ...]
    truth: tuple[int, ...]


def _rng(seed: int, latent: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(latent) & 0xFFFFFFFF, _TASK_SEED[task]])


def detection_job(latent: int, evidence: dict[int, LatentEvidence], n_examples: int, seed: int,
                  context: int = CONTEXT_TOKENS) -> Job | str:
    """The detection prompt's examples, or the status why there is none."""
    own = [t for t in evidence[latent].texts if t.pieces]
    if not own:
        return "no_examples"
    positives = [plain_text(own[r], context) for r in spread_ranks(len(own), n_examples // 2)]
    own_ids = {t.sample_id for t in evidence[latent].texts}
    taken = set(positives)
    pool: list[str] = []
    for other in sorted(evidence):
        if other == latent:
            continue
        for t in evidence[other].texts:
            if t.sample_id in own_ids or not t.pieces:
                continue
            text = plain_text(t, context)
            if text and text not in taken:  # the same text cannot be both kinds
                taken.add(text)
                pool.append(text)
    if not pool:
        return "no_negatives"
    rng = _rng(seed, latent, "detection")
    picks = rng.choice(len(pool), size=min(n_examples - n_examples // 2, len(pool)), replace=False)
    items = [(t, 1) for t in positives] + [(pool[i], 0) for i in sorted(picks)]
    order = rng.permutation(len(items))
    return Job(latent, "detection", tuple(items[i][0] for i in order), tuple(items[i][1] for i in order))


def fuzzing_job(latent: int, evidence: dict[int, LatentEvidence], n_examples: int, seed: int,
                context: int = CONTEXT_TOKENS) -> Job | str:
    """The fuzzing prompt's examples (half marked right, half wrong), or the status why there is none."""
    own = [t for t in evidence[latent].texts if t.pieces]
    if not own:
        return "no_examples"
    chosen = [own[r] for r in spread_ranks(len(own), n_examples)]
    right = [marked_text(t, None, context) for t in chosen]
    usable = [i for i, text in enumerate(right) if text is not None]
    rng = _rng(seed, latent, "fuzzing")
    wrong: dict[int, str] = {}
    for i in rng.permutation(usable):
        if len(wrong) >= len(usable) // 2:
            break
        text = marked_text(chosen[i], rng, context)
        if text is not None:
            wrong[int(i)] = text
    if not wrong or len(wrong) == len(usable):
        return "too_few_examples"
    items = [(wrong[i], 0) if i in wrong else (right[i], 1) for i in usable]
    order = rng.permutation(len(items))
    return Job(latent, "fuzzing", tuple(items[i][0] for i in order), tuple(items[i][1] for i in order))


# --- the judge ---------------------------------------------------------------------------------------------
class JudgeError(Exception):
    """The judge gave no answer (after the backend's retries); the message is the reason (key redacted)."""


class JudgeClient(OpenAIExplainer):
    """``chat(messages) -> str`` through OpenAIExplainer's ``complete``: the same timeouts, retry and
    back-off policy, status handling and key redaction as the explainer."""

    def __init__(self, cfg: ExplainerConfig) -> None:
        super().__init__(cfg, cache=None)
        self.name = str(cfg.model)

    def chat(self, messages: list[dict], label: int = -1) -> str:
        """The judge's answer text; raises JudgeError when every attempt failed. label: for logs only."""
        raw, reason = self.complete(messages, f"judge latent {label}")
        if raw is None:
            raise JudgeError(reason)
        return raw


def judge_client(cfg: MsaeConfig) -> JudgeClient:
    """The judge: scores.judge_model / judge_base_url, else the explainer's; the explainer's HTTP settings."""
    model = cfg.scores.judge_model or cfg.explainer.model
    if not model:
        raise ValueError("scores.judge='openai' needs scores.judge_model (or explainer.model)")
    settings = cfg.explainer.model_copy(update={
        "model": model, "base_url": cfg.scores.judge_base_url or cfg.explainer.base_url, "temperature": 0.0,
        "max_tokens": max(cfg.explainer.max_tokens, MIN_MAX_TOKENS)})
    return JudgeClient(settings)


def _ask(client: JudgeClient, templates: dict[str, JudgeTemplate], job: Job,
         concept: str) -> tuple[list[int] | None, str]:
    prompt = templates[job.task].render(concept, job.texts)
    try:
        raw = client.chat([{"role": "user", "content": prompt}], label=job.latent)
    except JudgeError as err:
        log.warning("judge %s of latent %d failed: %s", job.task, job.latent, err)
        return None, "error"
    except Exception:  # a bug in one request must not lose the others
        log.exception("judge %s of latent %d: unexpected failure", job.task, job.latent)
        return None, "error"
    labels, status = parse_judgement(raw, len(job.texts))
    if labels is None:
        log.warning("judge %s of latent %d: %s answer %r", job.task, job.latent, status, raw[:200])
    return labels, status


def judge_scores(evidence: dict[int, LatentEvidence], concepts: dict[int, str | None], cfg: MsaeConfig, *,
                 context_tokens: int = CONTEXT_TOKENS, client: JudgeClient | None = None) -> pl.DataFrame:
    """Detection and fuzzing scores of each latent's textual concept; one row per latent in ``concepts``.

    evidence: every latent whose top texts may serve as negatives (at least those in concepts).
    Columns: latent, detection_accuracy, detection_balanced, detection_f1, fuzzing_balanced,
    judge_status, judge (model name), judge_prompt_version. Deterministic for cfg.scores.seed
    given a deterministic judge.
    """
    client = client or judge_client(cfg)
    templates = load_judge_templates()
    n, seed = cfg.scores.judge_examples, cfg.scores.seed
    statuses: dict[int, dict[str, str]] = {}
    jobs: list[Job] = []
    for lat in sorted(concepts):
        statuses[lat] = {}
        concept = (concepts[lat] or "").strip()
        for task, build in (("detection", detection_job), ("fuzzing", fuzzing_job)):
            if not concept:
                statuses[lat][task] = "no_concept"
                continue
            if lat not in evidence:
                statuses[lat][task] = "no_examples"
                continue
            job = build(lat, evidence, n, seed, context_tokens)
            if isinstance(job, str):
                statuses[lat][task] = job
            else:
                jobs.append(job)
    answers: list[tuple[list[int] | None, str]] = []
    if jobs:
        with ThreadPoolExecutor(max_workers=min(client.cfg.concurrency, len(jobs)),
                                thread_name_prefix="msae-judge") as pool:
            answers = list(pool.map(lambda j: _ask(client, templates, j, concepts[j.latent].strip()), jobs))
    scores: dict[int, dict[str, float | None]] = {lat: {} for lat in statuses}
    for job, (labels, status) in zip(jobs, answers):
        statuses[job.latent][job.task] = status
        if labels is None:
            continue
        s = binary_scores(job.truth, labels)
        if job.task == "detection":
            scores[job.latent] |= {"detection_accuracy": s["accuracy"], "detection_balanced": s["balanced"],
                                   "detection_f1": s["f1"]}
        else:
            scores[job.latent]["fuzzing_balanced"] = s["balanced"]
    version = judge_prompt_version(templates)
    rows = []
    for lat, st in statuses.items():
        status = "ok" if all(st[t] == "ok" for t in TASKS) else ",".join(f"{t}:{st[t]}" for t in TASKS)
        rows.append({"latent": lat, "detection_accuracy": None, "detection_balanced": None, "detection_f1": None,
                     "fuzzing_balanced": None, **scores[lat], "judge_status": status, "judge": client.name,
                     "judge_prompt_version": version})
    counts: dict[str, int] = {}
    for st in statuses.values():
        for t in TASKS:
            counts[f"{t}:{st[t]}"] = counts.get(f"{t}:{st[t]}", 0) + 1
    log.info("judge %s: %d latents, %d prompts; %s", client.name, len(rows), len(jobs),
             ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return pl.DataFrame(rows, schema=COLUMNS)
