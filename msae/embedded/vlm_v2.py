"""Embedded VLM v2: the shapes-world LLaVA-NeXT taught to describe, with colours aligned to words.

Starts from the v1 model (``msae.embedded.vlm_train``: stages a–d2) and continues on world v2
(``msae.world.shapes``: descriptions, attribute-naming questions, the v1 kinds) with three changes:

* **Descriptions, also of masked views.** "what is shown ?" is asked of whole scenes ("small red
  circle and large blue square") and of the explainer's view — every patch outside a kept set
  black (``msae.embedded.views``): one object's patches (sometimes a part, sometimes spilling onto
  neighbours), two objects' patches, or background patches only ("background"). So the embedded
  VLM can *be* the pipeline's offline explainer, on masked and whole images alike.
* **Multi-word answers**: the loss covers every answer token and EOS.
* **Colour alignment** (LLaVA stage-1 style, but for one attribute only): for every object patch
  of the base view, the projector's output is pulled toward its colour word's input embedding by
  a cross-entropy over the cosines with the 8 colour words' embeddings. Shapes and sizes are
  deliberately *not* aligned.
* **Residual alignment** (``--residual-weight``, :func:`residual_alignment`) at the decoder
  layers msae captures: the projector alignment alone does not survive layer 0, which writes far
  more than the word embedding's norm into every text token, so each colour word's residual is
  pulled onto the direction of that colour's patches there. The residual stream then holds, by
  construction, a shared image/text direction per colour (multimodal concepts) and image-only
  shape/size directions (visual concepts); ``msae.embedded.probe`` checks this from activations
  and annotations only.

The committed model (``docs/shapes_vlm.md``): a v2 run from v1, then
``python -m msae.embedded.vlm_v2 --init-from <that model> --out data/shapes-llava --minutes 40 --lr 5e-4
--residual-weight 1.0 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from msae.embedded.views import masked_view, object_patches, background_patches, pick_keep, visible_objects
from msae.embedded.vlm_train import (
    VAL_SEED,
    _Schedule,
    _norm_consts,
    patch_targets,
    pixel_values,
    position_ids_from_mask,
    prompt_text,
)
from msae.extract.hooks import find_decoder_layers
from msae.vlm.build import VLMGeometry, build_processor, build_word_tokenizer, geometry_dict
from msae.world.config import ALL_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import COLORS, VOCABULARY, describe_objects, iter_world

EVAL_SEED = 99
TRAIN_SEED = 3
"""World seed of the v2 continuation (v1 used 0 and 2; 98 and 99 watch and evaluate; the
pipeline's calibration and evaluation worlds use seeds of their own, see the embedded profile)."""
MASKED_KIND = "describe_masked"
KINDS = (*ALL_QUESTION_KINDS, MASKED_KIND)
KIND_IDS = {k: i for i, k in enumerate(KINDS)}
DESCRIBE_QUESTION = "what is shown?"
DEFAULT_WEIGHTS = {
    "color": 2.0, "shape": 2.0, "exists": 1.0, "count": 0.3, "left_right": 1.0,
    "describe": 2.5, "describe_at": 2.0, "where": 1.5, MASKED_KIND: 3.0,
}  # fmt: skip


@dataclass
class V2Data:
    """World v2 as tensors: images (whole and masked views), per-patch colour targets, VQA samples."""

    pixels: torch.Tensor  # [N, H, W, 3] uint8
    patch_color: torch.Tensor  # [N, G*G] long: colour index, -100 where no object (or masked out)
    q_image: torch.Tensor  # [M]
    q_kind: torch.Tensor  # [M] index into KINDS
    q_ids: torch.Tensor  # [M, L] prompt + answer + EOS, left-padded
    q_mask: torch.Tensor  # [M, L]
    q_target_len: torch.Tensor  # [M] answer tokens + EOS

    def kind_indices(self, kind: str) -> torch.Tensor:
        return (self.q_kind == KIND_IDS[kind]).nonzero().squeeze(1)


def masked_describe_view(scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """One explainer's view of ``scene``: (pixels, kept [G, G] patches, the true description)."""
    n = len(scene.objects)
    u = rng.random()
    if u < 0.15 or n == 0:
        free = np.flatnonzero(background_patches(scene))
        if len(free):
            keep = np.zeros(background_patches(scene).shape, dtype=bool)
            keep.flat[rng.choice(free, size=min(len(free), int(rng.integers(1, 13))), replace=False)] = True
            return masked_view(scene.image, keep), keep, describe_objects(())
    k = int(rng.integers(n))
    keep = pick_keep(scene, k, rng, True)
    if u > 0.8 and n > 1:  # a latent that fires on two objects (e.g. two of one colour)
        j = int(rng.choice([i for i in range(n) if i != k]))
        keep = keep | object_patches(scene, j)
    visible = visible_objects(scene, keep, always=k)
    return masked_view(scene.image, keep), keep, describe_objects(visible)


def build_v2_data(cfg: ShapesConfig, processor, masked_per_scene: int = 1, patch_size: int = 8,
                  seed: int = 0, progress: bool = True) -> V2Data:
    """Generate ``cfg``'s world v2 in memory: every scene's questions plus ``masked_per_scene``
    masked-view descriptions, tokenised for training."""
    tok = processor.tokenizer
    eos = tok.eos_token_id
    rng = np.random.default_rng([seed, 7])
    pixels: list[np.ndarray] = []
    colors: list[np.ndarray] = []
    rows: list[tuple[int, str, list[int], int]] = []  # image, kind, ids, answer tokens + EOS
    prompt_cache: dict[str, list[int]] = {}
    dummy = None

    def add(image_index: int, kind: str, question: str, answer: str) -> None:
        if question not in prompt_cache:
            text = prompt_text(processor, question)
            prompt_cache[question] = processor(text=[text], images=[dummy], return_tensors="pt")["input_ids"][0].tolist()
        ans = tok.convert_tokens_to_ids(tok.tokenize(answer))
        if tok.unk_token_id in ans:
            raise ValueError(f"answer {answer!r} has a word outside the vocabulary")
        rows.append((image_index, kind, prompt_cache[question] + ans + [eos], len(ans) + 1))

    for _, scene, qas in tqdm(iter_world(cfg), total=cfg.n_images, desc=f"world v2 seed {cfg.seed}",
                              disable=not progress):
        dummy = dummy or scene.image
        i = len(pixels)
        pixels.append(np.asarray(scene.image))
        colors.append(_color_targets(patch_targets(scene, patch_size)["color"]))
        for qa in qas:
            add(i, qa.kind, qa.question, qa.answer)
        for _ in range(masked_per_scene):
            pix, keep, answer = masked_describe_view(scene, rng)
            j = len(pixels)
            pixels.append(pix)
            colors.append(np.where(keep.reshape(-1), colors[i], -100))
            add(j, MASKED_KIND, DESCRIBE_QUESTION, answer)
    length = max(len(r[2]) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for j, (_, _, seq, _) in enumerate(rows):
        ids[j, length - len(seq):] = torch.tensor(seq)
        mask[j, length - len(seq):] = 1
    return V2Data(
        pixels=torch.from_numpy(np.stack(pixels)),
        patch_color=torch.from_numpy(np.stack(colors)),
        q_image=torch.tensor([r[0] for r in rows]),
        q_kind=torch.tensor([KIND_IDS[r[1]] for r in rows]),
        q_ids=ids,
        q_mask=mask,
        q_target_len=torch.tensor([r[3] for r in rows]),
    )


def _color_targets(color_head: np.ndarray) -> np.ndarray:
    """Stage-(a) colour head (0 = background, 1.. = colours) → colour index or -100."""
    return np.where(color_head > 0, color_head - 1, -100)


def color_word_ids(tok) -> torch.Tensor:
    return torch.tensor(tok.convert_tokens_to_ids(list(COLORS)))


def residual_alignment(hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_token: int,
                       patch_color: torch.Tensor, color_ids: torch.Tensor, temperature: float = 10.0,
                       margin: float = 0.3) -> tuple[torch.Tensor, dict[str, float]]:
    """Pull colour *words* onto the colour *patches'* direction in one decoder layer's residual.

    Why: the projector alignment makes a red patch's input embedding point along the word "red"'s
    (cosine ~0.9 after centring), but layer 0 writes ~100x the embedding's norm into every text
    token, so from layer 1 on the word's residual no longer shares the patches' direction and a
    TopK SAE gives the two modalities separate latents. Here, per colour, the prototype is the mean
    base-view object-patch residual of that colour minus the mean of all base-view patches (detached:
    images define the direction, words move to it). Each text token, centred on the batch's text
    mean, is classified by ``temperature`` x its cosine with the prototypes against a fixed "no
    colour" logit at ``temperature`` x ``margin``: colour words must point along their colour's
    prototype, every other text token away from all of them (so "red" is *selectively* red).

    hidden [B, S, d] (the layer's output), ids / mask [B, S] with every image feature as one
    ``image_token``, patch_color [B, G*G] (colour index or -100 per base-view patch; the base view's
    features come first among a sample's image tokens).
    """
    b, _, d = hidden.shape
    n_base = patch_color.shape[1]
    img = ids == image_token
    base = img & (img.cumsum(1) <= n_base)
    h_img = hidden[base].view(b, n_base, d)
    obj = patch_color >= 0
    centred = (h_img[obj] - h_img.reshape(-1, d).mean(0)).detach()
    colour = patch_color[obj]
    k = len(color_ids)
    sums = torch.zeros(k, d, dtype=hidden.dtype).index_add_(0, colour, centred)
    counts = torch.bincount(colour, minlength=k)
    present = counts > 0
    protos = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
    text = mask.bool() & ~img
    h_txt = hidden[text]
    word = ids[text]
    colour_of_id = torch.full((int(max(int(ids.max()), int(color_ids.max()))) + 1,), k, dtype=torch.long)
    colour_of_id[color_ids] = torch.arange(k)  # k = "no colour"
    target = colour_of_id[word]
    target[(target < k) & ~present[target.clamp(max=k - 1)]] = -100  # a colour with no patch in the batch
    cos = F.normalize(h_txt - h_txt.mean(0), dim=-1) @ protos.T
    cos = cos.masked_fill(~present[None, :], -1.0)
    logits = temperature * torch.cat([cos, torch.full_like(cos[:, :1], margin)], dim=1)
    is_col = (target >= 0) & (target < k)
    is_other = target == k
    loss = torch.zeros((), dtype=hidden.dtype)
    stats: dict[str, float] = {}
    if is_col.any():
        loss = loss + F.cross_entropy(logits[is_col], target[is_col])
        stats["word_cos"] = float(cos[is_col].gather(1, target[is_col, None]).mean().detach())
        stats["word_acc"] = float((logits[is_col].argmax(-1) == target[is_col]).float().mean())
    if is_other.any():
        loss = loss + F.cross_entropy(logits[is_other], target[is_other])
        stats["other_cos"] = float(cos[is_other].max(-1).values.mean().detach())
    return loss, stats


def v2_loss(model, data: V2Data, idx: torch.Tensor, mean, std, color_ids: torch.Tensor,
            align_weight: float, align_temperature: float = 10.0,
            residual_weight: float = 0.0, residual_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer cross-entropy (every answer token and EOS) + colour alignment of projected patches
    (a cross-entropy over the cosines with the colour words' embeddings) and, with
    ``residual_weight``, :func:`residual_alignment` at the output of each of ``residual_layers``
    (the decoder layers msae captures)."""
    ids, mask, tlen = data.q_ids[idx], data.q_mask[idx], data.q_target_len[idx]
    keep = mask.any(0).nonzero()[0, 0]
    ids, mask = ids[:, keep:], mask[:, keep:]
    t_max = int(tlen.max())
    pv = pixel_values(data.pixels[data.q_image[idx]], mean, std)
    b, h, w = pv.shape[0], pv.shape[-2], pv.shape[-1]
    captured: list[torch.Tensor] = []
    residual: dict[int, torch.Tensor] = {}
    handles = [model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(o))]
    if residual_weight > 0:
        layers = find_decoder_layers(model)
        for layer in residual_layers:
            handles.append(layers[layer].register_forward_hook(
                lambda m, i, o, layer=layer: residual.__setitem__(layer, o[0] if isinstance(o, tuple) else o)))
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), pixel_values=pv,
                    image_sizes=torch.tensor([[h, w]] * b), logits_to_keep=t_max + 1)
    finally:
        for handle in handles:
            handle.remove()
    logits = out.logits[:, :-1]  # position j predicts token L - t_max + j
    targets = ids[:, -t_max:]
    valid = torch.arange(t_max)[None, :] >= (t_max - tlen)[:, None]
    ce = F.cross_entropy(logits[valid], targets[valid])
    # exact answer: every answer token and EOS right
    right = ((logits.argmax(-1) == targets) | ~valid).all(1)
    stats = {"ce": float(ce.detach()), "acc": float(right.float().mean())}
    loss = ce
    patch_color = data.patch_color[data.q_image[idx]]
    if align_weight > 0 and captured:
        proj = captured[0]  # [B * views, G*G, d]: views of one image are consecutive
        proj = proj.view(b, -1, *proj.shape[1:])[:, 0]  # the base view
        sel = patch_color >= 0
        if sel.any():
            emb = model.get_input_embeddings().weight[color_ids]
            cos = F.normalize(proj[sel], dim=-1) @ F.normalize(emb, dim=-1).T
            align = F.cross_entropy(align_temperature * cos, patch_color[sel])
            loss = loss + align_weight * align
            stats["align"] = float(align.detach())
            stats["align_acc"] = float((cos.argmax(-1) == patch_color[sel]).float().mean())
    for layer, hidden in residual.items():
        r_loss, r_stats = residual_alignment(hidden, ids, mask, model.config.image_token_index, patch_color,
                                             color_ids)
        loss = loss + residual_weight * r_loss
        stats[f"res{layer}"] = float(r_loss.detach())
        stats.update({f"{k}{layer}": v for k, v in r_stats.items()})
    return loss, stats


def extend_vocabulary(model, old_tok, geometry: VLMGeometry):
    """A tokenizer over today's :data:`VOCABULARY` whose ids extend ``old_tok``'s (v1 ids unchanged),
    the model's embeddings resized to it (new rows at the mean), and a processor for it."""
    tok = build_word_tokenizer(VOCABULARY)
    old = old_tok.get_vocab()
    new = tok.get_vocab()
    moved = [w for w, i in old.items() if new.get(w) != i]
    if moved:
        raise RuntimeError(f"vocabulary v2 changes the ids of v1 words {moved[:5]}")
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    return tok, build_processor(tok, geometry)


@torch.no_grad()
def evaluate_v2(model, processor, cfg: ShapesConfig, batch_size: int = 64, masked_per_scene: int = 1,
                max_new_tokens: int = 12, progress: bool = False) -> dict:
    """Held-out exact-answer accuracy per kind (greedy decoding through the real processor),
    masked-view descriptions included; also word-level accuracy of descriptions' colour and shape."""
    from PIL import Image

    model.eval()
    rng = np.random.default_rng([cfg.seed, 11])
    samples: list[tuple[Image.Image, str, str, str]] = []
    for _, scene, qas in iter_world(cfg):
        for qa in qas:
            samples.append((scene.image, qa.kind, qa.question, qa.answer))
        for _ in range(masked_per_scene):
            pix, _, answer = masked_describe_view(scene, rng)
            samples.append((Image.fromarray(pix), MASKED_KIND, DESCRIBE_QUESTION, answer))
    hits: dict[str, list[bool]] = {}
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate v2", disable=not progress):
        chunk = samples[start : start + batch_size]
        answers = generate_answers(model, processor, [s[0] for s in chunk], [s[2] for s in chunk], max_new_tokens)
        for (_, kind, _, truth), got in zip(chunk, answers, strict=True):
            hits.setdefault(kind, []).append(got == truth)
    per_kind = {k: {"accuracy": float(np.mean(hits[k])), "n": len(hits[k])} for k in KINDS if k in hits}
    every = [h for v in hits.values() for h in v]
    return {"per_kind": per_kind, "accuracy": float(np.mean(every)), "n": len(every), "seed": cfg.seed}


@torch.no_grad()
def generate_answers(model, processor, images, questions, max_new_tokens: int = 12) -> list[str]:
    """Greedy answers (words joined by spaces, EOS and padding dropped)."""
    tok = processor.tokenizer
    enc = processor(text=[prompt_text(processor, q) for q in questions], images=list(images), return_tensors="pt",
                    padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = []
    for row in new.tolist():
        words = []
        for t in row:
            if t in (tok.eos_token_id, tok.pad_token_id):
                break
            words.append(tok.convert_ids_to_tokens(t))
        texts.append(" ".join(words))
    return texts


def _draw(data: V2Data, weights: dict[str, float], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    kinds = [k for k in KINDS if weights.get(k, 0) > 0 and len(data.kind_indices(k))]
    probs = torch.tensor([weights[k] for k in kinds])
    which = torch.multinomial(probs, batch_size, replacement=True, generator=gen)
    out = []
    for j, k in enumerate(kinds):
        n = int((which == j).sum())
        if n:
            pool = data.kind_indices(k)
            out.append(pool[torch.randint(len(pool), (n,), generator=gen)])
    return torch.cat(out)


def lineage(previous: dict) -> dict:
    """What ``eval.json`` keeps of the model a v2 run continued: the v1 record, and, when that model
    was itself a v2 run, its held-out results and recipe under ``previous_v2`` (a chain of them)."""
    if previous.get("format") != "msae-shapes-llava/2":
        return {"v1": {k: previous[k] for k in ("held_out", "steps", "train_seconds") if k in previous}}
    record = {k: previous[k] for k in ("held_out", "v2", "train_seconds", "previous_v2") if k in previous}
    record["v2"] = {k: v for k, v in record.get("v2", {}).items() if k != "history"}
    return {"v1": previous.get("v1", {}), "previous_v2": record}


def train_v2(init_from: str | Path, out: str | Path, minutes: float, lr: float = 1e-3, batch_size: int = 32,
             seed: int = TRAIN_SEED, train_images: int = 20000, questions_per_image: int = 3,
             align_weight: float = 1.0, eval_images: int = 500, threads: int = 2,
             weights: dict[str, float] | None = None, monitor_every: int = 600,
             residual_weight: float = 0.0, residual_layers: tuple[int, ...] = (1, 3)) -> dict:
    """Continue ``init_from`` (v1) on world v2 for ``minutes`` and save the v2 model into ``out``."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_start = time.time()
    weights = dict(weights or DEFAULT_WEIGHTS)
    previous = json.loads((Path(init_from) / "eval.json").read_text())
    model = LlavaNextForConditionalGeneration.from_pretrained(init_from)
    old_processor = AutoProcessor.from_pretrained(init_from)
    g = VLMGeometry(**{k: (tuple(map(tuple, v)) if k == "grid_pinpoints" else v)
                       for k, v in previous["geometry"].items()})  # fmt: skip
    tok, processor = extend_vocabulary(model, old_processor.tokenizer, g)
    world = ShapesConfig(seed=seed, n_images=train_images, image_size=g.image_size,
                         questions_per_image=questions_per_image, always_ask=("describe",))
    data = build_v2_data(world, processor, seed=seed)
    print(f"v2 data: {len(data.pixels)} images, {len(data.q_ids)} samples, {time.time() - t_start:.0f}s", flush=True)
    val_cfg = ShapesConfig(seed=VAL_SEED, n_images=150, image_size=g.image_size, questions_per_image=2,
                           always_ask=("describe",))
    color_ids = color_word_ids(tok)
    mean, std = _norm_consts(processor)

    vt = model.model.vision_tower
    for p in model.parameters():
        p.requires_grad_(True)
    for p in vt.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    budget = minutes * 60 - (time.time() - t_start) - 120  # leave time to save and evaluate
    sched = _Schedule(opt, lr, 10**6, 100, budget)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    vt.eval()
    log: list[dict[str, float]] = []
    history: list[dict] = []
    t0 = time.time()
    step = 0
    bar = tqdm(desc="v2 (vqa + colour alignment)", mininterval=10)
    while time.time() - t0 < budget:
        sched.set(step)
        idx = _draw(data, weights, batch_size, gen)
        loss, stats = v2_loss(model, data, idx, mean, std, color_ids, align_weight,
                              residual_weight=residual_weight, residual_layers=residual_layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append(stats)
        step += 1
        bar.update(1)
        if step % 100 == 0:
            last = log[-100:]
            tqdm.write(f"[v2] step {step} " + " ".join(
                f"{k}={np.mean([s[k] for s in last if k in s]):.3f}" for k in ("ce", "acc", "align_acc", *(f"{m}{layer}" for layer in residual_layers
                                                    for m in ("res", "word_cos", "word_acc", "other_cos")))
                if any(k in s for s in last))
                + f" t={time.time() - t0:.0f}s")  # fmt: skip
        if monitor_every and step % monitor_every == 0:
            r = evaluate_v2(model, processor, val_cfg)
            history.append({"step": step, **{k: v["accuracy"] for k, v in r["per_kind"].items()}})
            print("  val(seed 98): " + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in r["per_kind"].items()),
                  flush=True)
            model.train()
            vt.eval()
    bar.close()
    seconds = time.time() - t_start
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    eval_cfg = ShapesConfig(seed=EVAL_SEED, n_images=eval_images, image_size=g.image_size, questions_per_image=3,
                            always_ask=("describe",))
    result = evaluate_v2(model, processor, eval_cfg, progress=True)
    report = {
        "format": "msae-shapes-llava/2",
        "held_out": result,
        "eval_world": eval_cfg.model_dump(mode="json"),
        "train_world": world.model_dump(mode="json"),
        "v2": {"init_from": str(init_from), "lr": lr, "batch_size": batch_size, "weights": weights,
               "align_weight": align_weight, "residual_weight": residual_weight,
               "residual_layers": list(residual_layers), "steps": step, "seconds": round(seconds, 1), "history": history,
               "final": {k: float(np.mean([s[k] for s in log[-200:] if k in s])) for k in log[-1]}},
        "train_seconds": round(previous["train_seconds"] + seconds, 1),
        "geometry": geometry_dict(g),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        **lineage(previous),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(result, indent=2), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msae.embedded.vlm_v2", description=__doc__.splitlines()[0])
    ap.add_argument("--init-from", required=True, help="the v1 model folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--align-weight", type=float, default=1.0)
    ap.add_argument("--residual-weight", type=float, default=0.0,
                    help="weight of the colour words' pull onto the colour patches' residual direction")
    ap.add_argument("--residual-layers", type=int, nargs="+", default=[1, 3],
                    help="decoder layers whose output is aligned (msae's captured layers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-images", type=int, default=500)
    args = ap.parse_args(argv)
    train_v2(args.init_from, args.out, args.minutes, lr=args.lr, seed=args.seed, train_images=args.train_images,
             align_weight=args.align_weight, threads=args.threads, eval_images=args.eval_images,
             residual_weight=args.residual_weight, residual_layers=tuple(args.residual_layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
