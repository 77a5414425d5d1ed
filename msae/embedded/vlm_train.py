"""Train the embedded default's small LLaVA-NeXT on the shapes world, in LLaVA-style stages.

A from-scratch LlavaNext trained end to end on VQA stays at chance for a long time on 2 CPU
cores: the language model has no reason to look at random image tokens. So, as LLaVA does:

(a) **vision pretraining** — the CLIP tower plus a linear head (discarded afterwards) predicts
    every base-view patch's ground truth (colour, shape, size of the object covering it most,
    that object's 3×3 cell and x position, and the scene's object count), so patch features
    carry the world's attributes linearly;
(b) **projector + LM** on VQA with the tower frozen (loss on the answer word and EOS only),
    colour/shape questions first (curriculum), then all kinds;
(c) **everything** on VQA at a lower learning rate.

Training scenes are generated in memory (seed ``--seed``, default 0) and cached as uint8 tensors;
the prompt ids come from the real processor once per distinct question and pixel values are
normalised exactly as the processor does (checked at start-up), so the inner loop has no
pre-processing. :func:`evaluate` goes through the real processor on a held-out world (seed 99 by
default; the pipeline's embedded default uses 1234, which is used for neither).

``python -m msae.embedded.vlm_train --out data/shapes-llava [--seed 0] [--minutes 40]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer, geometry_dict
from msae.world.config import ALL_QUESTION_KINDS, V1_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import COLORS, SHAPES, SIZES, VOCABULARY, iter_world, patch_coverage

EVAL_SEED = 99  # held-out world reported in eval.json
VAL_SEED = 98  # small world for progress logging only
KIND_IDS = {k: i for i, k in enumerate(ALL_QUESTION_KINDS)}
X_BINS = 8
# Patch-level targets of stage (a): name -> number of classes (-100 = ignored, e.g. background).
PATCH_HEADS: dict[str, int] = {
    "color": 1 + len(COLORS),  # 0 = background
    "shape": 1 + len(SHAPES),
    "size": 1 + len(SIZES),
    "cell_row": 3,
    "cell_col": 3,
    "x_bin": X_BINS,
    "count": 7,  # the scene's object count, on every patch
}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainData:
    """A world held as tensors: images, per-patch targets and tokenised VQA samples."""

    pixels: torch.Tensor  # [N, H, W, 3] uint8
    patch: dict[str, torch.Tensor]  # name -> [N, G*G] long
    q_image: torch.Tensor  # [M] image index of each VQA sample
    q_kind: torch.Tensor  # [M] index into ALL_QUESTION_KINDS
    q_ids: torch.Tensor  # [M, L] prompt + answer + EOS, left-padded
    q_mask: torch.Tensor  # [M, L] attention mask
    q_answer: torch.Tensor  # [M] answer token id
    q_one_object: torch.Tensor  # [M] bool, scene has a single object

    def kind_indices(self, kinds: Sequence[str] | None = None, one_object: bool = False) -> torch.Tensor:
        keep = torch.ones_like(self.q_kind, dtype=torch.bool)
        if kinds is not None:
            keep &= torch.isin(self.q_kind, torch.tensor([KIND_IDS[k] for k in kinds]))
        if one_object:
            keep &= self.q_one_object
        return keep.nonzero().squeeze(1)


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _norm_consts(processor) -> tuple[torch.Tensor, torch.Tensor]:
    ip = processor.image_processor
    return (
        torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
        torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1),
    )


def pixel_values(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n_views: int = 2) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the processor's [B, n_views, 3, H, W] for images of exactly the
    processor's size with a single pinpoint (the anyres tile equals the base view)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - mean) / std
    return x.unsqueeze(1).expand(-1, n_views, -1, -1, -1).contiguous()


def patch_targets(scene, patch_size: int) -> dict[str, np.ndarray]:
    """Stage (a) targets for one scene, on the base-view patch grid (same rule as
    ``annotations.parquet``: the object with the largest coverage, background if none)."""
    s = scene.image.width
    n = len(scene.objects)
    cov = patch_coverage(scene.masks, patch_size).reshape(n, -1)
    gg = cov.shape[1]
    best = cov.argmax(axis=0)
    obj = np.where(cov.max(axis=0) > 0, best, -1)
    out = {k: np.full(gg, -100, dtype=np.int64) for k in PATCH_HEADS}
    out["color"][:] = 0
    out["shape"][:] = 0
    out["size"][:] = 0
    out["count"][:] = n
    for k, o in enumerate(scene.objects):
        sel = obj == k
        out["color"][sel] = 1 + list(COLORS).index(o.color)
        out["shape"][sel] = 1 + SHAPES.index(o.shape)
        out["size"][sel] = 1 + SIZES.index(o.size)
        out["cell_row"][sel] = o.cell_row
        out["cell_col"][sel] = o.cell_col
        out["x_bin"][sel] = min(X_BINS - 1, int(o.center_x * X_BINS / s))
    return out


def build_train_data(cfg: ShapesConfig, processor, patch_size: int = 8, progress: bool = True) -> TrainData:
    """Generate ``cfg``'s world in memory and tokenise it for training."""
    tok = processor.tokenizer
    eos = tok.eos_token_id
    pixels, patch, q_image, q_kind, q_ans, q_one, seqs = [], {k: [] for k in PATCH_HEADS}, [], [], [], [], []
    prompt_cache: dict[str, list[int]] = {}
    dummy = None
    for i, (_, scene, qas) in enumerate(
        tqdm(iter_world(cfg), total=cfg.n_images, desc=f"world seed {cfg.seed}", disable=not progress)
    ):
        arr = np.asarray(scene.image)
        pixels.append(arr)
        for k, v in patch_targets(scene, patch_size).items():
            patch[k].append(v)
        if dummy is None:
            dummy = scene.image
        for qa in qas:
            if qa.question not in prompt_cache:
                ids = processor(text=[prompt_text(processor, qa.question)], images=[dummy], return_tensors="pt")
                prompt_cache[qa.question] = ids["input_ids"][0].tolist()
            ans = tok.convert_tokens_to_ids(qa.answer)
            assert ans != tok.unk_token_id, qa.answer
            seqs.append(prompt_cache[qa.question] + [ans, eos])
            q_image.append(i)
            q_kind.append(KIND_IDS[qa.kind])
            q_ans.append(ans)
            q_one.append(len(scene.objects) == 1)
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, length - len(s) :] = torch.tensor(s)
        mask[j, length - len(s) :] = 1
    return TrainData(
        pixels=torch.from_numpy(np.stack(pixels)),
        patch={k: torch.from_numpy(np.stack(v)) for k, v in patch.items()},
        q_image=torch.tensor(q_image),
        q_kind=torch.tensor(q_kind),
        q_ids=ids,
        q_mask=mask,
        q_answer=torch.tensor(q_ans),
        q_one_object=torch.tensor(q_one),
    )


def check_pixel_path(processor, data: TrainData, n: int = 4) -> None:
    """The cached pixel path must equal what the processor produces."""
    from PIL import Image

    imgs = [Image.fromarray(data.pixels[i].numpy()) for i in range(min(n, len(data.pixels)))]
    ref = processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
    mine = pixel_values(data.pixels[: len(imgs)], *_norm_consts(processor), n_views=ref.shape[1])
    if ref.shape != mine.shape or not torch.allclose(ref, mine, atol=1e-5):
        raise RuntimeError("cached pixel normalisation differs from the processor's output")


# ---------------------------------------------------------------------------------------------
# Stages


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_(min=0)


class _Schedule:
    """Linear warm-up, then cosine decay to 10 % of ``lr``; progress is the larger of the step
    fraction and the elapsed fraction of ``max_seconds``, so time-capped stages still decay."""

    def __init__(self, opt, lr: float, steps: int, warmup: int, max_seconds: float | None):
        self.opt, self.lr, self.steps, self.warmup, self.max_seconds = opt, lr, steps, warmup, max_seconds
        self.t0 = time.time()
        self.set(0)

    def set(self, step: int) -> None:
        if step < self.warmup:
            f = (step + 1) / self.warmup
        else:
            t = (step - self.warmup) / max(1, self.steps - self.warmup)
            if self.max_seconds:
                t = max(t, (time.time() - self.t0) / self.max_seconds)
            f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        for group in self.opt.param_groups:
            group["lr"] = self.lr * f


def _vision_features(model, pv: torch.Tensor) -> torch.Tensor:
    """Base-view patch features the projector sees: [B, G*G, d] (CLS dropped)."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pv, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def train_vision_stage(
    model,
    data: TrainData,
    processor,
    steps: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    max_seconds: float | None = None,
    log_every: int = 50,
) -> list[float]:
    """Stage (a): tower + a discarded linear head predict each patch's attributes. Returns losses."""
    vt = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    head = torch.nn.Linear(d, sum(PATCH_HEADS.values()))
    params = [*vt.parameters(), *head.parameters()]
    for p in vt.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _Schedule(opt, lr, steps, max(1, min(100, steps // 20)), max_seconds)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _norm_consts(processor)
    losses: list[float] = []
    vt.train()
    t0 = time.time()
    bar = tqdm(range(steps), desc="stage a (vision)", mininterval=5)
    for step in bar:
        sched.set(step)
        idx = torch.randint(len(data.pixels), (batch_size,), generator=gen)
        pv = pixel_values(data.pixels[idx], mean, std, n_views=1)[:, 0]
        feats = _vision_features(model, pv)  # [B, P, d]
        logits = head(feats).split(list(PATCH_HEADS.values()), dim=-1)
        loss = sum(
            F.cross_entropy(lg.reshape(-1, lg.shape[-1]), data.patch[k][idx].reshape(-1), ignore_index=-100)
            for k, lg in zip(PATCH_HEADS, logits, strict=True)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0:
            with torch.no_grad():
                acc = {k: _acc(lg, data.patch[k][idx]) for k, lg in zip(PATCH_HEADS, logits, strict=True)}
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}")
            tqdm.write(f"[a] step {step} loss {np.mean(losses[-log_every:]):.4f} "
                       + " ".join(f"{k}={v:.2f}" for k, v in acc.items()))  # fmt: skip
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    vt.eval()
    return losses


def _acc(logits: torch.Tensor, target: torch.Tensor) -> float:
    keep = target != -100
    return float((logits.argmax(-1)[keep] == target[keep]).float().mean()) if keep.any() else float("nan")


def vqa_loss(model, data: TrainData, idx: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the answer word and EOS of the samples ``idx``; also answer correctness."""
    ids, mask = data.q_ids[idx], data.q_mask[idx]
    keep = mask.any(0).nonzero()[0, 0]  # drop all-padding leading columns
    ids, mask = ids[:, keep:], mask[:, keep:]
    pv = pixel_values(data.pixels[data.q_image[idx]], mean, std)
    b, h, w = pv.shape[0], pv.shape[-2], pv.shape[-1]
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        pixel_values=pv,
        image_sizes=torch.tensor([[h, w]] * b),
        logits_to_keep=3,
    )
    logits = out.logits[:, :2]  # predicts answer, then EOS
    targets = ids[:, -2:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    correct = logits[:, 0].argmax(-1) == targets[:, 0]
    return loss, correct


def _pool(data: TrainData, kinds, one_object: bool = False, weights: dict[str, float] | None = None):
    """Sample indices per kind, with the kinds' sampling weights (None: as generated)."""
    if weights is None:
        return [(1.0, data.kind_indices(kinds, one_object))]
    ks = [k for k in (kinds or ALL_QUESTION_KINDS) if weights.get(k, 0) > 0]
    total = sum(weights[k] for k in ks)
    return [(weights[k] / total, data.kind_indices([k], one_object)) for k in ks]


def _draw(pool, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    probs = torch.tensor([w for w, _ in pool])
    which = torch.multinomial(probs, batch_size, replacement=True, generator=gen)
    out = []
    for j, (_, idx) in enumerate(pool):
        n = int((which == j).sum())
        if n:
            out.append(idx[torch.randint(len(idx), (n,), generator=gen)])
    return torch.cat(out)


def train_vqa_stage(
    model,
    data: TrainData,
    processor,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    train_vision: bool = False,
    curriculum: Sequence[tuple[float, Sequence[str] | None, bool]] = ((0.0, None, False),),
    max_seconds: float | None = None,
    log_every: int = 50,
    name: str = "b",
    monitor=None,
) -> list[float]:
    """Stages (b)/(c): VQA with the answer-only loss. ``curriculum`` is a list of
    (start fraction of ``steps``, question kinds or None for all, one-object scenes only
    [, {kind: sampling weight}])."""
    vt = model.model.vision_tower
    for p in model.parameters():
        p.requires_grad_(True)
    if not train_vision:
        for p in vt.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _Schedule(opt, lr, steps, max(1, min(100, steps // 10)), max_seconds)
    gen = torch.Generator().manual_seed(seed)
    mean, std = _norm_consts(processor)
    model.train()
    if not train_vision:
        vt.eval()
    pools = [(int(c[0] * steps), _pool(data, *c[1:])) for c in curriculum]
    losses: list[float] = []
    correct: list[float] = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"stage {name} (vqa)", mininterval=5)
    for step in bar:
        sched.set(step)
        idx = _draw([p for start, p in pools if start <= step][-1], batch_size, gen)
        loss, ok = vqa_loss(model, data, idx, mean, std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        correct.append(float(ok.float().mean()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}")
            tqdm.write(f"[{name}] step {step} loss {np.mean(losses[-log_every:]):.4f} "
                       f"train-acc {np.mean(correct[-log_every:]):.3f} t={time.time() - t0:.0f}s")  # fmt: skip
        if monitor is not None and step and step % monitor[0] == 0:
            monitor[1](model)
            model.train()
            if not train_vision:
                vt.eval()
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


# ---------------------------------------------------------------------------------------------
# Evaluation


def chance_levels(cfg: ShapesConfig) -> dict[str, float]:
    return {
        "color": 1 / len(COLORS),
        "shape": 1 / len(SHAPES),
        "exists": 0.5,
        "count": 1 / (cfg.max_objects - cfg.min_objects + 1),
        "left_right": 0.5,
    }


@torch.no_grad()
def evaluate(model, processor, cfg: ShapesConfig, batch_size: int = 64, progress: bool = False) -> dict:
    """Held-out accuracy per question kind through the real processor: the answer is the argmax
    of the next-token logits after the generation prompt (greedy decoding of the answer word).

    Returns ``{"per_kind": {kind: {"accuracy", "n", "chance"}}, "accuracy", "n", "seed"}``.
    """
    model.eval()
    samples = [(scene.image, qa) for _, scene, qas in iter_world(cfg) for qa in qas]
    chance = chance_levels(cfg)
    hits: dict[str, list[bool]] = {}
    tok = processor.tokenizer
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", disable=not progress):
        chunk = samples[start : start + batch_size]
        enc = processor(
            text=[prompt_text(processor, qa.question) for _, qa in chunk],
            images=[img for img, _ in chunk],
            return_tensors="pt",
            padding=True,
        )
        out = model(**enc, position_ids=position_ids_from_mask(enc["attention_mask"]), logits_to_keep=1)
        pred = out.logits[:, -1].argmax(-1).tolist()
        for (_, qa), p in zip(chunk, pred, strict=True):
            hits.setdefault(qa.kind, []).append(tok.convert_ids_to_tokens(p) == qa.answer)
    per_kind = {
        k: {"accuracy": float(np.mean(v)), "n": len(v), "chance": chance[k]}
        for k, v in sorted(hits.items(), key=lambda kv: KIND_IDS[kv[0]])
    }
    all_hits = [h for v in hits.values() for h in v]
    return {"per_kind": per_kind, "accuracy": float(np.mean(all_hits)), "n": len(all_hits), "seed": cfg.seed}


# ---------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Recipe:
    seed: int = 0
    train_images: int = 30000
    questions_per_image: int = 3
    eval_seed: int = EVAL_SEED
    eval_images: int = 1000
    minutes: float = 40.0
    # stage (a)
    a_steps: int = 3000
    a_lr: float = 3e-3
    a_batch: int = 64
    a_share: float = 0.12
    # stage (b)
    b_steps: int = 4500
    b_lr: float = 1.5e-3
    b_batch: int = 32
    b_share: float = 0.5
    # stage (c)
    c_steps: int = 3500
    c_lr: float = 3e-4
    c_batch: int = 32
    geometry: VLMGeometry = field(default_factory=VLMGeometry)


def run(recipe: Recipe, out: str | Path, threads: int = 2) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(recipe.seed)
    t_start = time.time()
    budget = recipe.minutes * 60
    g = recipe.geometry
    tokenizer = build_word_tokenizer(VOCABULARY)
    model, processor = build_llava_next(tokenizer, g, seed=recipe.seed)
    world = ShapesConfig(
        seed=recipe.seed, n_images=recipe.train_images, image_size=g.image_size,
        questions_per_image=recipe.questions_per_image, question_kinds=V1_QUESTION_KINDS,
    )  # fmt: skip
    data = build_train_data(world, processor, g.patch_size)
    check_pixel_path(processor, data)
    print(f"train data: {len(data.pixels)} images, {len(data.q_ids)} questions, "
          f"{time.time() - t_start:.0f}s", flush=True)  # fmt: skip
    val_cfg = ShapesConfig(seed=VAL_SEED, n_images=300, image_size=g.image_size, question_kinds=V1_QUESTION_KINDS)

    def monitor(m) -> None:
        r = evaluate(m, processor, val_cfg)
        print("  val(seed 98): " + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in r["per_kind"].items()), flush=True)

    steps = {}
    remaining = lambda: budget - (time.time() - t_start)  # noqa: E731
    la = train_vision_stage(model, data, processor, recipe.a_steps, recipe.a_lr, recipe.a_batch, recipe.seed,
                            max_seconds=recipe.a_share * remaining())  # fmt: skip
    steps["a"] = len(la)
    lb = train_vqa_stage(
        model, data, processor, recipe.b_steps, recipe.b_lr, recipe.b_batch, recipe.seed + 1,
        train_vision=False,
        curriculum=((0.0, ("color", "shape"), False), (0.25, None, False)),
        max_seconds=recipe.b_share / (1 - recipe.a_share) * remaining(), name="b", monitor=(500, monitor),
    )  # fmt: skip
    steps["b"] = len(lb)
    monitor(model)
    lc = train_vqa_stage(
        model, data, processor, recipe.c_steps, recipe.c_lr, recipe.c_batch, recipe.seed + 2,
        train_vision=True, max_seconds=remaining() - 90, name="c", monitor=(500, monitor),
    )  # fmt: skip
    steps["c"] = len(lc)
    train_seconds = time.time() - t_start

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    eval_cfg = ShapesConfig(seed=recipe.eval_seed, n_images=recipe.eval_images, image_size=g.image_size,
                           question_kinds=V1_QUESTION_KINDS)
    result = evaluate(model, processor, eval_cfg, progress=True)
    report = {
        "held_out": result,
        "eval_world": eval_cfg.model_dump(mode="json"),
        "train_world": world.model_dump(mode="json"),
        "steps": steps,
        "final_loss": {"a": float(np.mean(la[-50:])), "b": float(np.mean(lb[-50:])), "c": float(np.mean(lc[-50:]))},
        "train_seconds": round(train_seconds, 1),
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "geometry"},
        "geometry": geometry_dict(g),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return report


DEFAULT_CONTINUE_WEIGHTS = {"color": 4.0, "shape": 3.0, "exists": 2.0, "count": 0.5, "left_right": 2.0}


def continue_training(
    init_from: str | Path,
    out: str | Path,
    minutes: float,
    lr: float = 1.5e-3,
    seed: int = 0,
    train_images: int = 30000,
    train_vision: bool = False,
    weights: dict[str, float] | None = None,
    eval_seed: int = EVAL_SEED,
    eval_images: int = 1000,
    threads: int = 2,
) -> dict:
    """Stage (d): continue VQA training of a saved model (projector + LM, the tower too if
    ``train_vision``) at a stage-(b) learning rate, with kind sampling weights that favour the
    kinds still behind; its eval.json keeps the earlier run's held-out result."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed + 3)
    t_start = time.time()
    weights = dict(weights or DEFAULT_CONTINUE_WEIGHTS)
    previous = json.loads((Path(init_from) / "eval.json").read_text())
    model = LlavaNextForConditionalGeneration.from_pretrained(init_from)
    processor = AutoProcessor.from_pretrained(init_from)
    g = VLMGeometry(**{k: (tuple(map(tuple, v)) if k == "grid_pinpoints" else v)
                       for k, v in previous["geometry"].items()})  # fmt: skip
    world = ShapesConfig(seed=seed, n_images=train_images, image_size=g.image_size, questions_per_image=3,
                         question_kinds=V1_QUESTION_KINDS)
    data = build_train_data(world, processor, g.patch_size)
    check_pixel_path(processor, data)
    val_cfg = ShapesConfig(seed=VAL_SEED, n_images=300, image_size=g.image_size, question_kinds=V1_QUESTION_KINDS)

    def monitor(m) -> None:
        r = evaluate(m, processor, val_cfg)
        print("  val(seed 98): " + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in r["per_kind"].items()), flush=True)

    budget = minutes * 60 - (time.time() - t_start) - 60
    ld = train_vqa_stage(
        model, data, processor, 100000, lr, 32, seed + 3, train_vision=train_vision,
        curriculum=((0.0, None, False, weights),), max_seconds=budget, name="d", monitor=(500, monitor),
    )  # fmt: skip
    seconds = time.time() - t_start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    eval_cfg = ShapesConfig(seed=eval_seed, n_images=eval_images, image_size=g.image_size,
                           question_kinds=V1_QUESTION_KINDS)
    result = evaluate(model, processor, eval_cfg, progress=True)
    steps = {**previous["steps"], "d": len(ld)}
    report = {
        **{k: v for k, v in previous.items() if k not in ("previous",)},
        "held_out": result,
        "eval_world": eval_cfg.model_dump(mode="json"),
        "steps": steps,
        "final_loss": {**previous.get("final_loss", {}), "d": float(np.mean(ld[-50:]))},
        "train_seconds": round(previous["train_seconds"] + seconds, 1),
        "stage_d": {"lr": lr, "weights": weights, "train_vision": train_vision, "seconds": round(seconds, 1), "init_from": str(init_from)},
        "held_out_before_stage_d": previous["held_out"],
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msae.embedded.vlm_train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder for the model, processor and eval.json")
    ap.add_argument("--seed", type=int, default=0, help="training world and init seed")
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget of the whole run")
    ap.add_argument("--train-images", type=int, default=Recipe.train_images)
    ap.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    ap.add_argument("--a-steps", type=int, default=Recipe.a_steps)
    ap.add_argument("--b-steps", type=int, default=Recipe.b_steps)
    ap.add_argument("--c-steps", type=int, default=Recipe.c_steps)
    ap.add_argument("--init-from", default=None,
                    help="continue from a saved model (stage d only: all weights, kind-weighted VQA)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="stage d learning rate (with --init-from)")
    args = ap.parse_args(argv)
    if args.eval_seed in (args.seed, 1234, VAL_SEED):
        ap.error("the evaluation seed must differ from the training seed, 98 and 1234")
    if args.init_from:
        continue_training(args.init_from, args.out, args.minutes, lr=args.lr, seed=args.seed,
                          train_images=args.train_images, eval_seed=args.eval_seed,
                          threads=args.threads)  # fmt: skip
        return 0
    recipe = Recipe(seed=args.seed, minutes=args.minutes, train_images=args.train_images, eval_seed=args.eval_seed,
                    a_steps=args.a_steps, b_steps=args.b_steps, c_steps=args.c_steps)  # fmt: skip
    run(recipe, args.out, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
