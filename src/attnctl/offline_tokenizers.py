"""Tokenizers that can be built without a download.

- The real CLIP tokenizer of Stable Diffusion, rebuilt from OpenAI's BPE merges file that the `open-clip-torch` wheel
  carries (install it with `pip install --no-deps open-clip-torch`; only its data file is read, the package is never
  imported, so torchvision is not needed).
- A small T5-style (SentencePiece unigram) tokenizer trained here on a fixed word list, for random-weight FLUX and
  SD3 models in tests and timing.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from .errors import UsageError

CLIP_VOCAB_SIZE = 49408


def byte_alphabet() -> list[str]:
    """The 256 stand-ins for bytes used by byte-level BPE, in vocabulary order: printable bytes (as themselves)
    first, then the others, mapped to code points from 256 on (GPT-2's and CLIP's `bytes_to_unicode` table, its
    values in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
        if path.exists():
            return path
    raise UsageError(
        "building the CLIP tokenizer offline needs OpenAI's BPE file from the open-clip-torch wheel: "
        "run `pip install --no-deps open-clip-torch` (or load a real model folder, which carries its tokenizer)"
    )


def _cache_dir() -> Path:
    root = Path(os.environ.get("ATTNCTL_CACHE", Path.home() / ".cache" / "attnctl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt of SD's CLIP tokenizer, written once into the cache folder."""
    folder = _cache_dir() / "clip-bpe"
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_path.exists() and merges_path.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]]
        alphabet = byte_alphabet()
        tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return str(vocab_path), str(merges_path)


def clip_tokenizer(max_length: int = 77):
    """SD's CLIP tokenizer, built offline from the vocabulary and merges `clip_tokenizer_files` caches, with
    `max_length` as its `model_max_length`."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = clip_tokenizer_files()
    vocab = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in Path(merges_path).read_text(encoding="utf-8").splitlines()[1:] if line]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


_T5_WORDS = """a an the of and or with without on in at to from by for under over above below behind beside between
near next left right top bottom front back small large big tiny huge red green blue yellow purple orange pink black
white brown gray grey golden silver wooden metal glass cat dog bird horse cow sheep elephant bear zebra giraffe car bus
truck bicycle boat train plane chair table bed sofa lamp clock vase cup bowl bottle apple banana orange cake pizza
flower tree tree grass sky cloud sun moon mountain river lake sea beach city street house building room kitchen park
forest snow rain night day man woman boy girl child person people photo painting drawing picture sketch style of a in
circle square triangle star heart ball box hat glasses wearing sitting standing running flying holding playing two
three four many one some is are has have""".split()


@lru_cache(maxsize=1)
def t5_like_tokenizer():
    """A SentencePiece-unigram tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2): a fixed word list as
    whole pieces, characters for everything else. Stands in for T5's tokenizer in random-weight models."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-#\"()"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(_T5_WORDS)]
    pieces += [(c, -8.0) for c in chars] + [("\u2581" + c, -8.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


# --- chat tokenizers (FLUX.2, Z-Image): byte-level BPE with the chat template of the real one --------------------

_CHAT_WORDS = _T5_WORDS + """user assistant system you are that reasons about image descriptions give structured
responses focusing object relationships attribution actions speculation""".split()

# Qwen3's chat template for the messages these pipelines send (one user message), with its `enable_thinking` switch
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")

# Mistral Small 3's chat template for a system message and user messages (text blocks, or strings)
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if system_message is defined %}{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}{%- endif %}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}{%- else %}{{- '[IMG]' }}{%- endif %}{%- endfor %}"
    "{{- '[/INST]' }}{%- endif %}{%- endif %}{%- endfor %}")


def _byte_level_words(specials: list[str], added: list[str] = ()):
    """A byte-level BPE `tokenizers.Tokenizer`: every byte a token, the chat word list whole (with and without a
    leading space, matched before any merge as Llama 3's and Qwen's vocabularies match their words), `specials` and
    `added` (plain added tokens, as Qwen3's <think>) after them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = byte_alphabet()
    char = {b: alphabet[i] for i, b in enumerate(_byte_order())}
    vocab = {c: i for i, c in enumerate(alphabet)}
    for word in dict.fromkeys(_CHAT_WORDS):
        for piece in (" " + word, word):
            vocab.setdefault("".join(char[b] for b in piece.encode("utf-8")), len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(specials))
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in added])
    return tokenizer


def _byte_order() -> list[int]:
    """The bytes in the order of `byte_alphabet`: printable ones first, then the others."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


@lru_cache(maxsize=2)
def qwen3_like_tokenizer():
    """Stands in for Qwen3's tokenizer (Z-Image, FLUX.2 [klein]): byte-level BPE, Qwen's chat tokens
    (<|endoftext|> pads, <|im_end|> ends), <think>/</think> as plain added tokens, Qwen3's chat template, padding
    on the right. Built offline."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_words(specials, ["<think>", "</think>"]), eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=specials[1:], padding_side="right",
        model_max_length=131072)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


@lru_cache(maxsize=4)
def mistral3_like_tokenizer(padding_side: str = "left"):
    """Stands in for Mistral Small 3's tokenizer (FLUX.2 [dev]): byte-level BPE, a start token <s> added to every
    text it encodes with special tokens (its chat template writes <s> itself, and the chat path adds none), the
    instruction tokens, Mistral 3's chat template, padding on `padding_side`. Built offline."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    raw = _byte_level_words(specials)
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=specials[4:], padding_side=padding_side, model_max_length=131072)
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


# --- Gemma (Lumina-Image 2.0): SentencePiece pieces marked with ▁, a start token, no end token ----------------------

_GEMMA_WORDS = _CHAT_WORDS + """designed generate superior degree text alignment based textual prompts prompt
start""".split()


@lru_cache(maxsize=2)
def gemma_like_tokenizer(padding_side: str = "left"):
    """Stands in for Gemma 2's tokenizer (Lumina-Image 2.0's text encoder): SentencePiece pieces with ▁ marking a
    space and no space added before the text (Gemma's "a red dog" is `a ▁red ▁dog`), a fixed word list as whole
    pieces and characters for everything else, Gemma's special tokens (<pad>=0, <eos>=1, <bos>=2, <unk>=3), <bos>
    added before every text it encodes and no end token, padding on `padding_side` (Gemma's own is the left; the
    Lumina pipeline sets the right). Built offline."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-#\"()<>/"
    pieces = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for word in dict.fromkeys(_GEMMA_WORDS):
        pieces += [("\u2581" + word, -1.0), (word, -1.5)]
    pieces += [(c, -8.0) for c in chars] + [("\u2581" + c, -8.0) for c in chars]
    tok = Tokenizer(models.Unigram(list(dict.fromkeys(pieces)), unk_id=3))
    tok.normalizer = normalizers.Replace(" ", "\u2581")  # Gemma's: every space a ▁, none added in front
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " ")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side=padding_side, model_max_length=8192)


# --- Llama 3 (HiDream-I1): byte-level BPE, <|begin_of_text|> before every text, no end token ------------------------

@lru_cache(maxsize=2)
def llama3_like_tokenizer(padding_side: str = "right"):
    """Stands in for Llama 3.1 Instruct's tokenizer (HiDream-I1's fourth text encoder): byte-level BPE (a space
    joins the word after it, as Ġ), the chat word list whole, <|begin_of_text|> added before every text it encodes
    and no end token, <|eot_id|> its end-of-sequence token (the HiDream pipeline pads with it), no pad token of its
    own, padding on `padding_side` (Llama 3's own: the right). Built offline."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    raw = _byte_level_words(specials)
    bos = raw.token_to_id("<|begin_of_text|>")
    raw.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        additional_special_tokens=specials[1:2] + specials[3:], padding_side=padding_side, model_max_length=131072)


# --- Qwen3-VL (Qwen-Image 2.1): Qwen's chat tokens and the vision placeholders, in a processor without video ---------

# Qwen3-VL's chat template for text messages (content a string or a list of text blocks), as Qwen-Image 2.1 renders
# its system message with it
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- else %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@lru_cache(maxsize=1)
def qwen3vl_like_processor():
    """Stands in for Qwen3-VL's processor (Qwen-Image 2.1's): a `Qwen3VLProcessor` with a byte-level BPE tokenizer
    holding Qwen's chat tokens and the vision placeholders (<|vision_start|>, <|image_pad|>, ...), Qwen3-VL's chat
    template for text messages, and transformers' PIL image processor for Qwen2-VL. It has no video processor:
    transformers builds Qwen3-VL's only with torchvision, which has no wheel for a CPU-only torch on PyPI, and the
    text-to-image pipeline never reads it. Built offline."""
    from transformers import PreTrainedTokenizerFast, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class Qwen3VLProcessorWithoutVideo(Qwen3VLProcessor):
        """Qwen3VLProcessor whose sub-processors are the image processor and the tokenizer only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_words(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:], padding_side="right", model_max_length=262144)
    return Qwen3VLProcessorWithoutVideo(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer,
                                        chat_template=QWEN3VL_CHAT_TEMPLATE)
