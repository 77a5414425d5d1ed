"""Extraction throughput: msae's extractor vs the reference approach, on tiny random LLaVA-NeXTs.

Reference: one sample at a time, a full forward with ``output_hidden_states=True`` (every layer
and the LM head run), the wanted layers copied out as float16 — and nothing written.
msae: :func:`msae.extract.extract_activations` — batched, one pass for all layers, forward stopped
after the deepest layer, zarr + token table written, resumable bookkeeping included.

Two models (random init, nothing downloaded): (i) the default tiny geometry (64-px images, 8×8
base grid) and (ii) the real llama3-llava-next-8b vision geometry (336-px CLIP-L/14 crops,
anyres pinpoints, ~1.2–2.9k image tokens per sample) with a tiny language model.

    .venv/bin/python benchmarks/bench_extract.py [--threads auto|N] [--no-write]

Prints a table and rewrites the "Extraction" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msae.config import ExtractionConfig  # noqa: E402
from msae.extract import extract_activations  # noqa: E402
from msae.runtime import THREADS_HELP, bench_threads, threads_option  # noqa: E402
from msae.store import Store  # noqa: E402
from msae.vlm.build import (  # noqa: E402
    LLAMA3_LLAVA_NEXT_8B_GEOMETRY,
    VLMGeometry,
    build_llava_next,
    build_word_tokenizer,
)
from msae.vlm.load import LoadedVLM  # noqa: E402
from msae.world.shapes import VOCABULARY  # noqa: E402

QUESTIONS = ["what color is the circle ?", "how many objects are there ?", "is the square left of the cross ?"]
ANSWERS = ["red", "three", "yes"]


def make_samples(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0) -> pl.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        path = folder / f"s{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        rows.append({"sample_id": f"s{i}", "image": str(path), "question": QUESTIONS[i % 3],
                     "answer": ANSWERS[i % 3], "source_index": i})
    return pl.DataFrame(rows)


def reference(samples: pl.DataFrame, vlm: LoadedVLM, layers: list[int]) -> tuple[float, int]:
    """One sample at a time, full forward, output_hidden_states, no early stop. Returns (s, tokens)."""
    from msae.data.images import load_image_rgb

    proc, model = vlm.processor, vlm.model
    t0 = time.perf_counter()
    n_tokens = 0
    kept = []
    for row in samples.iter_rows(named=True):
        img = load_image_rgb(row["image"])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        text = proc.apply_chat_template(msgs)  # the same text msae feeds
        inputs = proc(images=[img], text=[text], return_tensors="pt")
        with torch.inference_mode():
            hs = model(**inputs, output_hidden_states=True).hidden_states
        for layer in layers:
            kept.append(hs[layer + 1][0].to(torch.float16).numpy())
        n_tokens += int(inputs["input_ids"].shape[1])
    return time.perf_counter() - t0, n_tokens


def ours(samples: pl.DataFrame, vlm: LoadedVLM, layers: list[int], store_root: Path, batch: int) -> tuple[float, int]:
    cfg = ExtractionConfig(chunk_samples=64, rows_per_zarr_chunk=4096)
    t0 = time.perf_counter()
    res = extract_activations(samples, vlm, layers, Store(str(store_root)), cfg, progress=False, batch_size=batch)
    return time.perf_counter() - t0, res.n_tokens


def run_case(name: str, geometry: VLMGeometry, n: int, sizes, layers, batch: int, tmp: Path,
             repeats: int) -> dict:
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), geometry, seed=0)
    vlm = LoadedVLM(model.eval().requires_grad_(False), processor, torch.device("cpu"), torch.float32)
    samples = make_samples(tmp / name / "images", n, sizes)
    warm = samples.head(2)
    reference(warm, vlm, layers)  # warm-up both paths
    ours(warm, vlm, layers, tmp / name / "warm", batch)
    t_ref = t_ours = float("inf")
    for r in range(repeats):  # alternate the two paths; keep each one's best (least disturbed) run
        t, tok_ref = reference(samples, vlm, layers)
        t_ref = min(t_ref, t)
        t, tok_ours = ours(samples, vlm, layers, tmp / name / f"store{r}", batch)
        t_ours = min(t_ours, t)
    assert tok_ref == tok_ours, (tok_ref, tok_ours)
    return {
        "model": name,
        "samples": n,
        "tokens": tok_ours,
        "tok/sample": round(tok_ours / n),
        "layers": f"{layers} of {geometry.text_layers}",
        "batch": batch,
        "reference tok/s": round(tok_ref / t_ref),
        "msae tok/s": round(tok_ours / t_ours),
        "speed-up": round(t_ref / t_ours, 2),
    }


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_results(table: str, threads: int, repeats: int) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (
        "## Extraction\n\n"
        f"Command: `.venv/bin/python benchmarks/bench_extract.py --threads {threads} --repeats {repeats}`  \n"
        f"Date: {dt.date.today().isoformat()}  \n"
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}, shared with other "
        f"jobs), torch {torch.__version__} CPU, {threads} torch thread(s), float32 models, float16 storage.\n\n"
        "Reference = one sample at a time, full forward with `output_hidden_states=True` (all layers and the "
        "LM head run), wanted layers copied out as float16, nothing written. msae = "
        "`extract_activations`: batched (right padding), all layers in one pass, forward stopped after the "
        "deepest requested layer, zarr arrays + token table + progress records written. Both include image "
        "loading and the processor. Models are random-init tiny LLaVA-NeXTs: `default` = the default "
        "`VLMGeometry()` (64-px, 8×8 base grid, 4-layer LM, width 128); `8b-geometry` = "
        "`LLAMA3_LLAVA_NEXT_8B_GEOMETRY` (336-px CLIP-L/14 crops, the 8B's anyres pinpoints, tiny LM).\n\n"
        f"{table}\n\n"
        "speed-up = reference wall time / msae wall time on the same samples (same token count); each path "
        "ran `--repeats` times, alternating, and its fastest run counts.\n\n"
        f"Load average at the end of the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other jobs "
        "shared them, so absolute figures and ratios move noticeably from run to run (a loaded machine "
        "penalises whichever path a burst of foreign load hits).\n\n"
        "Reading the numbers: in these tiny models the language model is a small share of the work (image "
        "loading, the processor's anyres resizing and the vision tower dominate), so stopping after the "
        "requested layer saves little and CPU batching adds no parallelism; the gap grows with the share "
        "of the LM (a real 8B: 32 layers of width 4096 plus a 128k-vocabulary head, batched on a GPU). "
        "Batches are right-padded and run WITHOUT an attention mask (exact for a causal LM: real tokens "
        "never see the pads after them); with the padding mask SDPA left its fused causal kernel and the "
        "8b-geometry case ran at 0.59× the reference in an earlier run of this script.\n"
    )
    pattern = re.compile(r"^## Extraction\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=threads_option, default="auto", help=THREADS_HELP)
    ap.add_argument("--repeats", type=int, default=2, help="runs per path; the fastest counts")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args()
    args.threads = bench_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(run_case("default", VLMGeometry(), 480, [(64, 64), (80, 60), (48, 96)], [1], 16, tmp,
                             args.repeats))
        rows.append(run_case("8b-geometry", LLAMA3_LLAVA_NEXT_8B_GEOMETRY, 72,
                             [(336, 336), (500, 300), (300, 500)], [1], 4, tmp, args.repeats))
    table = markdown(rows)
    print(table)
    if not args.no_write:
        write_results(table, args.threads, args.repeats)


if __name__ == "__main__":
    main()
