"""GPU check at paper scale: a randomly initialised LLaVA-NeXT-8B (bf16) — extraction, OOM back-off,
SAE training at 131,072 latents / k = 256, the latent-stats pass. Nothing is downloaded.

    benchmarks/gpu_check.sh                 # on a CUDA machine (≤ 8 minutes on one H200)
    python benchmarks/gpu_check.py --cpu-smoke   # everything shrunk, on CPU: does the script work?

The model is built in code with the configuration of ``llava-hf/llama3-llava-next-8b-hf``: CLIP
ViT-L/14-336 tower (24 layers, width 1024, penultimate-layer features), the 8B's anyres pinpoints,
Llama-3-8B (32 layers, width 4096, GQA 32/8 heads, MLP 14,336, vocabulary 128,320) and its
2-layer GELU projector — random weights, so the speed and memory are the real model's, the values
are not. The tokenizer is the shapes world's word-level one (no download): text is a few dozen
tokens per sample against ~1.2–2.9k image tokens, so this barely changes the cost.

Sections, each in its own ``try`` with a time budget (``SIGALRM``), results written after each:

1. ``env`` — torch / CUDA / GPU.
2. ``build`` — the model on the GPU in bf16: parameters, weight memory, build time.
3. ``extraction`` — msae's extractor (batched, right-padded, forward stopped after layer 24,
   zarr + token table written; batch size ``auto``) against the reference approach (one sample
   at a time, full forward with ``output_hidden_states=True``, layer copied out); tokens/s,
   samples/s, time per 1,000 samples, peak GPU memory, and how far the two agree on one sample.
4. ``oom_backoff`` — the same extraction with the GPU capped (``set_per_process_memory_fraction``)
   so that the first batch cannot fit: the batch must be halved, not the run failed.
5. ``sae_train`` — :func:`msae.sae.train.train_sae` on the captured layer-24 activations;
   tokens/s from two runs of different length (fixed costs cancel), final training FVU, memory.
6. ``latent_stats`` — :func:`msae.latents.stats.compute_latent_stats` (if that module exists) on
   the trained SAE, the paper's first 5,000 latents.

Writes ``benchmarks/results_gpu.json`` (``--out``) and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
SIZES = [(336, 336), (500, 300), (300, 500), (672, 672), (640, 480), (1008, 336)]  # 1–5 anyres crops
QUESTIONS = ["what color is the circle ?", "how many objects are there ?", "is the square left of the cross ?"]
ANSWERS = ["red", "three", "yes"]


# --- plumbing --------------------------------------------------------------------------------------


class SectionTimeout(Exception):
    pass


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (Unix only)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(_sig: int, _frame: Any) -> None:
        raise SectionTimeout(f"section ran past its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Run:
    """Results of all sections, saved after each one so that a killed run still leaves a file."""

    def __init__(self, out: Path, total_budget: float, meta: dict[str, Any]) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.total_budget = total_budget
        self.data: dict[str, Any] = {**meta, "sections": {}}

    def left(self) -> float:
        return self.total_budget - (time.perf_counter() - self.t0)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.data["total_wall_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def section(self, name: str, budget: float, fn: Callable[[], dict[str, Any]], needs: float = 20.0) -> dict | None:
        """Run ``fn`` within ``min(budget, time left)``; record its dict, or why it failed."""
        left = self.left()
        if left < needs:
            self.data["sections"][name] = {"ok": False, "error": f"skipped: {left:.0f} s left of the total budget"}
            self.save()
            print(f"[{name}] skipped ({left:.0f} s left)", flush=True)
            return None
        print(f"[{name}] start (budget {min(budget, left):.0f} s)", flush=True)
        t = time.perf_counter()
        try:
            with time_budget(min(budget, left)):
                value = fn()
            rec = {"ok": True, **value}
        except SectionTimeout as err:
            rec = {"ok": False, "error": str(err)}
        except Exception as err:  # noqa: BLE001 - every section is independent
            rec = {"ok": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-3000:]}
        rec["wall_s"] = round(time.perf_counter() - t, 2)
        self.data["sections"][name] = rec
        self.save()
        print(f"[{name}] {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} ({rec['wall_s']} s)", flush=True)
        free_memory()
        return rec if rec["ok"] else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --- the model ---------------------------------------------------------------------------------------


def llama3_llava_next_8b_config(tokenizer: Any) -> Any:
    """``llava-hf/llama3-llava-next-8b-hf``'s architecture, written out (no download); the image token
    id is the local tokenizer's, the vocabulary the real model's (embedding and LM head at full size)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from msae.vlm.build import IMAGE, LLAMA3_LLAVA_NEXT_8B_GEOMETRY as G

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=G.image_size, patch_size=G.patch_size, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=128_320, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=500_000.0, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return LlavaNextConfig(vision_config=vision, text_config=text,
                           image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
                           image_grid_pinpoints=[list(p) for p in G.grid_pinpoints],
                           vision_feature_select_strategy="default", vision_feature_layer=G.vision_feature_layer,
                           projector_hidden_act="gelu", tie_word_embeddings=False)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, processor): the full 8B on the GPU, or (``--cpu-smoke``) the 8B vision geometry with a tiny LM."""
    from transformers import LlavaNextForConditionalGeneration

    from msae.vlm.build import LLAMA3_LLAVA_NEXT_8B_GEOMETRY, build_llava_next, build_processor, build_word_tokenizer
    from msae.world.shapes import VOCABULARY

    tokenizer = build_word_tokenizer(VOCABULARY)
    if args.cpu_smoke:
        model, processor = build_llava_next(tokenizer, LLAMA3_LLAVA_NEXT_8B_GEOMETRY, seed=0)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False), processor
    config = llama3_llava_next_8b_config(tokenizer)
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight on the GPU: no 32 GB fp32 copy in host memory
        try:
            model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # older transformers
            model = LlavaNextForConditionalGeneration._from_config(config, torch_dtype=dtype,
                                                                   attn_implementation="sdpa")
    return model.eval().requires_grad_(False), build_processor(tokenizer, LLAMA3_LLAVA_NEXT_8B_GEOMETRY)


def count_full_8b_parameters() -> int:
    """Parameters of the full configuration, built on the meta device (no memory): a check that the
    written-out config is the 8B's (~8.36e9)."""
    from transformers import LlavaNextForConditionalGeneration

    from msae.vlm.build import build_word_tokenizer
    from msae.world.shapes import VOCABULARY

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(llama3_llava_next_8b_config(build_word_tokenizer(VOCABULARY)))
    return sum(p.numel() for p in model.parameters())


# --- extraction ----------------------------------------------------------------------------------------


def make_samples(folder: Path, n: int) -> Any:
    import polars as pl
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / f"s{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        rows.append({"sample_id": f"s{i}", "image": str(path), "question": QUESTIONS[i % 3],
                     "answer": ANSWERS[i % 3], "source_index": i})
    return pl.DataFrame(rows)


def reference_pass(samples: Any, vlm: Any, layer: int, keep: int = 1) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The reference approach: one sample per forward, full forward, ``output_hidden_states=True``."""
    from msae.data.images import load_image_rgb

    proc, model, dev = vlm.processor, vlm.model, vlm.device
    kept: list[np.ndarray] = []
    n_tokens = 0
    sync(dev)
    t0 = time.perf_counter()
    for i, row in enumerate(samples.iter_rows(named=True)):
        img = load_image_rgb(row["image"])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        inputs = proc(images=[img], text=[proc.apply_chat_template(msgs)], return_tensors="pt")
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(vlm.dtype)
        with torch.inference_mode():
            hs = model(**inputs, output_hidden_states=True).hidden_states
            out = hs[layer + 1][0].to(torch.float16).cpu().numpy()
        if i < keep:
            kept.append(out)
        n_tokens += int(inputs["input_ids"].shape[1])
        del hs
    sync(dev)
    wall = time.perf_counter() - t0
    return {"samples": samples.height, "tokens": n_tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(n_tokens / wall), "samples_per_s": round(samples.height / wall, 2)}, kept


def msae_pass(samples: Any, vlm: Any, layer: int, store_dir: Path, batch_size: int | str | None = None,
              chunk: int = 64) -> dict[str, Any]:
    from msae.config import ExtractionConfig
    from msae.extract import extract_activations
    from msae.store import Store

    cfg = ExtractionConfig(chunk_samples=chunk, rows_per_zarr_chunk=4096, store_dtype="float16")
    reset_peak(vlm.device)
    sync(vlm.device)
    t0 = time.perf_counter()
    res = extract_activations(samples, vlm, [layer], Store(str(store_dir)), cfg, progress=False,
                              batch_size=batch_size)
    sync(vlm.device)
    wall = time.perf_counter() - t0
    return {"samples": samples.height, "tokens": res.n_tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(res.n_tokens / wall), "samples_per_s": round(samples.height / wall, 2),
            "batch_size": res.batch_size, "oom_halvings": res.oom_halvings, "fp16_clamped": res.fp16_clamped,
            "peak_gpu_gib": peak_gib(vlm.device)}


def agreement(store_dir: Path, layer: int, sample_id: str, ref: np.ndarray) -> dict[str, float]:
    """How close msae's stored rows of one sample are to the reference's (bf16 kernels differ a little
    between a batched and a single forward)."""
    import polars as pl
    import zarr

    from msae.store import Store

    store = Store(str(store_dir))
    tokens = store.read_parquet(store.TOKENS).with_row_index()
    rows = tokens.filter(pl.col("sample_id") == sample_id)["index"].to_numpy()
    arr = zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True), mode="r")
    ours = np.asarray(arr[int(rows[0]) : int(rows[-1]) + 1]).astype(np.float32)
    ref = ref.astype(np.float32)
    if ours.shape != ref.shape:
        return {"shape_ours": list(ours.shape), "shape_reference": list(ref.shape)}
    diff = np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-12)
    cos = (ours * ref).sum(1) / np.maximum(np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return {"relative_error": float(diff), "min_row_cosine": float(cos.min())}


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="shrink everything and run on CPU (a script check)")
    ap.add_argument("--samples", type=int, default=None, help="samples per extraction pass (GPU: 96, smoke: 6)")
    ap.add_argument("--layer", type=int, default=None, help="layer to capture (GPU: 24, smoke: 2)")
    ap.add_argument("--width", type=int, default=None, help="SAE latents (GPU: 131072, smoke: 512)")
    ap.add_argument("--k", type=int, default=None, help="SAE k (GPU: 256, smoke: 16)")
    ap.add_argument("--budget-s", type=float, default=None, help="total time budget (GPU: 420, smoke: 600)")
    ap.add_argument("--out", type=Path, default=None, help="results file (GPU: benchmarks/results_gpu.json)")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    n = args.samples or (6 if smoke else 96)
    layer = args.layer if args.layer is not None else (2 if smoke else 24)
    width = args.width or (512 if smoke else 131_072)
    k = args.k or (16 if smoke else 256)
    out = args.out or (Path(tempfile.gettempdir()) / "msae_gpu_check_smoke.json" if smoke
                       else ROOT / "benchmarks" / "results_gpu.json")
    torch.set_float32_matmul_precision("high")
    import transformers

    run = Run(out, args.budget_s or (600 if smoke else 420), {
        "mode": "cpu-smoke" if smoke else "gpu", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": {"samples": n, "layer": layer, "width": width, "k": k, "dtype": str(dtype).removeprefix("torch."),
                     "image_sizes": SIZES},
    })
    state: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="msae_gpu_check_"))

    def env() -> dict[str, Any]:
        info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            free, total = torch.cuda.mem_get_info(device)
            info |= {"gpu": props.name, "gpu_memory_gib": round(total / GIB, 1), "free_gib": round(free / GIB, 1),
                     "cuda_version": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
        return info

    def build() -> dict[str, Any]:
        from msae.config import ModelConfig
        from msae.vlm.load import LoadedVLM

        t = time.perf_counter()
        model, processor = build_model(args, device, dtype)
        sync(device)
        cfg = ModelConfig(name_or_path="random-init-llama3-llava-next-8b", dtype="float32" if smoke else "bfloat16",
                          device=str(device), batch_size="auto", auto_batch_max=64)
        state["vlm"] = LoadedVLM(model, processor, device, dtype, cfg)
        rec = {"build_s": round(time.perf_counter() - t, 1),
               "parameters": sum(p.numel() for p in model.parameters()),
               "decoder_layers": model.config.text_config.num_hidden_layers,
               "d_model": model.config.text_config.hidden_size}
        if device.type == "cuda":
            rec["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
        if smoke:
            rec["full_8b_parameters_meta"] = count_full_8b_parameters()
        return rec

    def extraction() -> dict[str, Any]:
        vlm = state["vlm"]
        samples = make_samples(tmp / "images", n)
        warm = samples.head(2)
        reference_pass(warm, vlm, layer)  # kernels, allocator and processor caches warm for both paths
        msae_pass(warm, vlm, layer, tmp / "warm", batch_size=2)
        ref, kept = reference_pass(samples, vlm, layer)
        ours = msae_pass(samples, vlm, layer, tmp / "store")  # batch size: auto
        state["store"] = tmp / "store"
        rec = {"reference": ref, "msae": ours, "speedup": round(ref["wall_s"] / ours["wall_s"], 2),
               "same_tokens": ref["tokens"] == ours["tokens"],
               "agreement_sample_s0": agreement(tmp / "store", layer, "s0", kept[0])}
        for name, r in (("reference", ref), ("msae", ours)):
            rec[f"{name}_s_per_1000_samples"] = round(1000 / r["samples_per_s"], 1)
        return rec

    def oom_backoff() -> dict[str, Any]:
        vlm = state["vlm"]
        state.pop("sae", None)  # the SAE's GPU memory is not part of this check
        samples = make_samples(tmp / "images", min(n, 32))
        if device.type != "cuda":  # CPU: simulate the error above 2 samples
            real = vlm.model.forward

            def forward(*a: Any, **kw: Any) -> Any:
                if kw["input_ids"].shape[0] > 2:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated on CPU)")
                return real(*a, **kw)

            vlm.model.forward = forward
            try:
                return msae_pass(samples, vlm, layer, tmp / "oom", batch_size=4) | {"simulated": True}
            finally:
                del vlm.model.forward
        free_memory()
        total = torch.cuda.get_device_properties(device).total_memory
        cap = torch.cuda.memory_allocated(device) + 4 * GIB  # weights + 4 GiB: a batch of 32 cannot fit
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
        try:
            rec = msae_pass(samples, vlm, layer, tmp / "oom", batch_size=32, chunk=32)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return rec | {"memory_cap_gib": round(cap / GIB, 1), "started_at_batch": 32}

    def sae_train() -> dict[str, Any]:
        from msae.config import SAEConfig
        from msae.sae.stage import open_layer
        from msae.sae.train import train_sae
        from msae.store import Store

        store = Store(str(state["store"]))
        array, tokens = open_layer(store, layer), store.read_parquet(store.TOKENS)
        batch = 256 if smoke else 4096
        short, long = (3, 15) if smoke else (10, 60)

        def fit(steps: int) -> tuple[Any, float]:
            cfg = SAEConfig(k=k, batch_size=batch, token_budget=batch * steps, buffer_rows=8 * batch if smoke else 131_072,
                            init_sample_tokens=2048 if smoke else 16_384, checkpoint_every=10**9, seed=0)
            reset_peak(device)
            sync(device)
            t = time.perf_counter()
            res = train_sae(array, tokens, cfg, width, None, str(device), progress=False)
            sync(device)
            return res, time.perf_counter() - t

        _, t_short = fit(short)
        res, t_long = fit(long)
        state["sae"] = res.model
        tok_s = (long - short) * batch / max(t_long - t_short, 1e-9)
        last = res.log.tail(1).to_dicts()[0] if res.log.height else {}
        return {"width": width, "k": k, "batch_tokens": batch, "steps": [short, long],
                "run_wall_s": [round(t_short, 2), round(t_long, 2)], "train_tokens_per_s": round(tok_s),
                "s_per_million_tokens": round(1e6 / tok_s, 1), "final_train_fvu": last.get("fvu"),
                "rows_available": int(array.shape[0]), "peak_gpu_gib": peak_gib(device)}

    def latent_stats() -> dict[str, Any]:
        try:
            from msae.latents.stats import compute_latent_stats
        except ImportError as err:
            return {"skipped": f"msae.latents.stats not available: {err}"}
        from msae.config import LatentsConfig
        from msae.sae.stage import open_layer
        from msae.store import Store

        store = Store(str(state["store"]))
        array, tokens = open_layer(store, layer), store.read_parquet(store.TOKENS)
        cfg = LatentsConfig(select="first", n=min(5000, width), top_k=5)
        reset_peak(device)
        sync(device)
        t = time.perf_counter()
        res = compute_latent_stats(state["sae"], array, tokens, cfg, device=str(device))
        sync(device)
        wall = time.perf_counter() - t
        return {"latents_selected": cfg.n, "tokens": int(array.shape[0]), "pass_s": round(wall, 2),
                "tokens_per_s": round(array.shape[0] / wall), "summary": res.summary,
                "peak_gpu_gib": peak_gib(device)}

    try:
        run.section("env", 30, env, needs=0)
        if run.section("build", 45 if smoke else 150, build):
            if run.section("extraction", 200 if smoke else 170, extraction):
                run.section("sae_train", 120, sae_train)
                if "sae" in state:
                    run.section("latent_stats", 120 if smoke else 90, latent_stats)
            run.section("oom_backoff", 60, oom_backoff)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary(run.data))
    print(f"\nresults: {out}")
    return 0 if all(s.get("ok") for s in run.data["sections"].values()) else 1


def summary(data: dict[str, Any]) -> str:
    s = data["sections"]
    lines = [f"msae GPU check ({data['mode']}, {s.get('env', {}).get('gpu', 'cpu')}, torch {data['torch']})"]
    if (b := s.get("build", {})).get("ok"):
        lines.append(f"  model: {b['parameters'] / 1e9:.2f} B parameters, built in {b['build_s']} s"
                     + (f", weights {b['weights_gib']} GiB" if "weights_gib" in b else ""))
    if (e := s.get("extraction", {})).get("ok"):
        r, m = e["reference"], e["msae"]
        lines.append(f"  extraction: msae {m['tokens_per_s']} tok/s ({m['samples_per_s']} samples/s, batch "
                     f"{m['batch_size']}, peak {m['peak_gpu_gib']} GiB) vs reference {r['tokens_per_s']} tok/s "
                     f"-> {e['speedup']}x; {e['msae_s_per_1000_samples']} s per 1,000 samples")
    if (o := s.get("oom_backoff", {})).get("ok"):
        lines.append(f"  OOM back-off: batch {o.get('started_at_batch', 4)} -> {o['batch_size']} "
                     f"({o['oom_halvings']} halvings), {o['samples']} samples done")
    if (t := s.get("sae_train", {})).get("ok"):
        lines.append(f"  SAE training: {t['train_tokens_per_s']} tok/s at {t['width']} latents, k={t['k']} "
                     f"(peak {t['peak_gpu_gib']} GiB)")
    if (st := s.get("latent_stats", {})).get("ok"):
        lines.append(f"  latent stats: {st.get('tokens_per_s', '-')} tok/s" if "skipped" not in st
                     else f"  latent stats: {st['skipped']}")
    failed = [f"{k}: {v['error']}" for k, v in s.items() if not v.get("ok")]
    lines += [f"  FAILED {f}" for f in failed]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
