"""Build small LLaVA-NeXT models (random init) with a word-level tokenizer and a real processor.

Two uses: the embedded default's VLM (trained on the shapes world, see ``msae.embedded.vlm_train``) and
test fixtures with the *real* LLaVA-NeXT-8B geometry (336-px CLIP-L/14 tower, the 8B's anyres
pinpoints), so that token→patch mapping is tested against the packing transformers really does.
Everything here is saved with ``save_pretrained`` and reloaded through the same
``from_pretrained`` path as a hub checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)
TEMPLATE_WORDS = ("user", "assistant", ":", "?", ".", ",")

# A minimal chat template in the shape LLaVA-NeXT processors expect: the image placeholder comes
# first in the user turn, then the question; the generation prompt ends with "assistant :".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} : "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: one id per word, punctuation split off.

    Word-level keeps the synthetic world's vocabulary tiny and makes every text token a whole
    word, which is what textual concepts are read from.
    """
    vocab_words = list(dict.fromkeys([*SPECIAL_TOKENS, *TEMPLATE_WORDS, *(w.lower() for w in words)]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class VLMGeometry:
    """The shape of a LLaVA-NeXT: vision tower, anyres pinpoints and language-model sizes."""

    image_size: int = 64
    patch_size: int = 8
    grid_pinpoints: tuple[tuple[int, int], ...] = ((64, 64),)
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_feature_layer: int = -1
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256
    max_position_embeddings: int = 512
    extra: dict = field(default_factory=dict)


# The geometry of llava-hf/llama3-llava-next-8b-hf's vision side (CLIP ViT-L/14-336, its anyres
# pinpoints, penultimate-layer features); language-model sizes kept tiny for tests.
LLAMA3_LLAVA_NEXT_8B_GEOMETRY = VLMGeometry(
    image_size=336,
    patch_size=14,
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    vision_feature_layer=-2,
    text_hidden=64,
    text_layers=4,
    text_heads=2,
    text_intermediate=128,
    max_position_embeddings=4096,
)


def build_processor(tokenizer: PreTrainedTokenizerFast, geometry: VLMGeometry) -> LlavaNextProcessor:
    """A real LlavaNextProcessor whose image processor matches the geometry."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": geometry.image_size},
        crop_size={"height": geometry.image_size, "width": geometry.image_size},
        image_grid_pinpoints=[list(p) for p in geometry.grid_pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )


def build_llava_next(
    tokenizer: PreTrainedTokenizerFast, geometry: VLMGeometry = VLMGeometry(), seed: int = 0
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A randomly initialised LlavaNextForConditionalGeneration plus its processor."""
    vision = CLIPVisionConfig(
        hidden_size=geometry.vision_hidden,
        intermediate_size=geometry.vision_hidden * 4,
        num_hidden_layers=geometry.vision_layers,
        num_attention_heads=geometry.vision_heads,
        image_size=geometry.image_size,
        patch_size=geometry.patch_size,
        projection_dim=geometry.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=geometry.text_hidden,
        intermediate_size=geometry.text_intermediate,
        num_hidden_layers=geometry.text_layers,
        num_attention_heads=geometry.text_heads,
        num_key_value_heads=geometry.text_heads,
        max_position_embeddings=geometry.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=[list(p) for p in geometry.grid_pinpoints],
        vision_feature_select_strategy="default",
        vision_feature_layer=geometry.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, build_processor(tokenizer, geometry)


def geometry_dict(geometry: VLMGeometry) -> dict:
    return asdict(geometry)
