"""Words and phrases of a prompt -> token positions, for any tokenizer a pipeline carries.

A text sequence seen by attention can be made of several tokenizers' outputs laid side by side (SD3: CLIP tokens then
T5 tokens). `TextSegment` says where one tokenizer's tokens start in that sequence; `PromptTokens` answers "which
positions hold this word" across all segments, and raises a `UsageError` that lists the prompt's tokens when the word
is not there, or when a pipeline called with a shorter text (`max_sequence_length`) cut it (`PromptTokens.held`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from .errors import UsageError
from .text import phrase_spans
from .text import words as split_words

log = logging.getLogger(__name__)

_MARKERS = ("</w>", "\u2581", "\u0120", "##")


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's tokens inside the attention's text sequence, starting at `offset`, `length` positions long.
    A pipeline that wraps the prompt in a `template` ("...{}...") and drops `drop` tokens of the encoder's output
    from index `drop_from` on (Qwen-Image: its chat template's first 34; Sana: its instruction's tokens but the start
    token and the last) has the prompt's tokens at their templated position less `drop` (a `drop` of -1 repeats the
    token before `drop_from`: Sana with an instruction of empty text keeps the start token twice). `lowercase`: the
    pipeline lowercases and strips the prompt before tokenizing it (PixArt, Sana). `padding_side`: the side the
    pipeline pads on where it sets one itself (Sana pads on the right whatever its Gemma tokenizer says); "" for the
    tokenizer's."""

    tokenizer: object
    offset: int
    length: int
    template: str = "{}"
    drop: int = 0
    drop_from: int = 0
    lowercase: bool = False
    padding_side: str = ""

    def pads_left(self) -> bool:
        """Whether padding goes on the left, putting the prompt's tokens at the segment's end: `padding_side`, else the
        tokenizer's own."""
        return (self.padding_side or getattr(self.tokenizer, "padding_side", "")) == "left"


def _clean_piece(piece: str) -> str:
    for marker in _MARKERS:
        piece = piece.replace(marker, "")
    return piece.lower()


def _token_char_spans(seg: TextSegment, prompt: str) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Token ids as the pipeline feeds them to attention (special tokens included, the template's dropped tokens
    left out) and each token's character span in the prompt (None for special tokens and the template's text)."""
    tokenizer = seg.tokenizer
    before, _, after = seg.template.partition("{}")
    lead = 0
    if seg.lowercase:
        lead = len(prompt) - len(prompt.lstrip())
        prompt = prompt.strip().lower()
    text = before + prompt + after
    try:  # fast tokenizers give each token's characters
        enc = tokenizer(text, truncation=False, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = [None if a == b else (a, b) for a, b in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        ids = list(tokenizer(text, truncation=False, add_special_tokens=True)["input_ids"])
        spans = _walk_spans(tokenizer, text, ids)
    special = set(getattr(tokenizer, "all_special_ids", []))
    start, end = len(before), len(before) + len(prompt)  # the prompt inside `text`
    shift = start - lead  # spans count characters of the prompt as given
    spans = [None if i in special or s is None or s[1] <= start or s[0] >= end
             else (max(s[0], start) - shift, min(s[1], end) - shift) for i, s in zip(ids, spans)]
    cut = slice(seg.drop_from, seg.drop_from + seg.drop)
    return ids[: cut.start] + ids[cut.stop :], spans[: cut.start] + spans[cut.stop :]


def _walk_spans(tokenizer, prompt: str, ids: list[int]) -> list[tuple[int, int] | None]:
    """Fallback for tokenizers without offsets: find each token's text in the prompt, left to right."""
    lowered = prompt.lower()
    cursor, spans = 0, []
    for piece in tokenizer.convert_ids_to_tokens(ids):
        text = _clean_piece(piece)
        at = lowered.find(text, cursor) if text else -1
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(text)))
        cursor = at + len(text)
    return spans


@dataclass
class PromptTokens:
    """Token positions of one prompt in an attention text sequence."""

    prompt: str
    segments: list[TextSegment]

    def __post_init__(self):
        self._spans: list[tuple[int, tuple[int, int]]] = []  # (sequence position, char span)
        self.token_strings: list[str] = []
        self._counts: list[int] = []  # per segment: the prompt's tokens, special ones included, before any cut
        self._closed: list[bool] = []  # per segment: its tokenizer ends the text with an end token, kept when cut
        self.end_of_text: int | None = None  # sequence position of the first segment's first end token
        self.start_of_text: int | None = None  # the first segment's start token (CLIP's), None if it has none (T5)
        for seg in self.segments:
            ids, spans = _token_char_spans(seg, self.prompt)
            eos = getattr(seg.tokenizer, "eos_token_id", None)
            closed = eos is not None and bool(ids) and ids[-1] == eos
            self._counts.append(len(ids))
            self._closed.append(closed)
            kept = ids[: seg.length]
            # a tokenizer that pads on the left (Kolors' ChatGLM) puts the prompt's tokens at the end of the sequence
            start = seg.offset + (seg.length - len(kept) if seg.pads_left() else 0)
            if len(ids) > seg.length:
                cut_chars = [s for s in spans[seg.length - closed :] if s is not None]
                cut = self.prompt[cut_chars[0][0] :] if cut_chars else ""
                warnings.warn(
                    f"the prompt is longer than the text encoder's limit of {seg.length} tokens; "
                    f"this part was cut and has no effect: {cut!r}",
                    stacklevel=2,
                )
                if closed:  # the tokenizer keeps its end token in the last kept position
                    spans = spans[: seg.length - 1] + [None]
            for pos, span in enumerate(spans[: len(kept)]):
                if span is not None:
                    self._spans.append((start + pos, span))
            if seg is self.segments[0]:
                self.token_strings = [_clean_piece(p) for p in seg.tokenizer.convert_ids_to_tokens(kept)]
                ends = [i for i, t in enumerate(kept) if t == eos]
                if len(ids) > seg.length and closed:
                    ends = [seg.length - 1]
                self.end_of_text = start + ends[0] if ends else None
                bos = getattr(seg.tokenizer, "bos_token_id", None)
                self.start_of_text = start if kept and bos is not None and kept[0] == bos else None

    def same_places(self, other: PromptTokens) -> bool:
        """Whether `other` (the same prompt laid out otherwise) puts every token of the prompt, and the start and end
        tokens, where this does, with as many tokens in each segment: the positions methods use are the same."""
        return (self._spans, self.start_of_text, self.end_of_text, self._counts, self._closed) == (
            other._spans, other.start_of_text, other.end_of_text, other._counts, other._closed)

    @property
    def token_count(self) -> int:
        """Positions the first segment's text holds before its padding, special tokens included."""
        return min(self._counts[0], self.segments[0].length)

    def words(self) -> list[tuple[str, int, int]]:
        """(word, start, end) for every word of the prompt."""
        return split_words(self.prompt)

    def span_positions(self, start: int, end: int) -> list[int]:
        """Sequence positions of every token overlapping characters [start, end) of the prompt."""
        return sorted({pos for pos, (a, b) in self._spans if a < end and b > start})

    def word_positions(self, spec: str) -> list[int]:
        """Positions of a word given as `word` (first occurrence) or `word#n` (n-th occurrence, from 1)."""
        word, occurrence = parse_occurrence(spec)
        matches = [(s, e) for w, s, e in self.words() if w.lower() == word.lower()]
        return self._positions_of(spec, matches, occurrence, what="word")

    def phrase_positions(self, phrase: str, occurrence: int = 1) -> list[int]:
        """Positions of a verbatim part of the prompt (case-insensitive), its `occurrence`-th appearance."""
        return self._positions_of(phrase, phrase_spans(self.prompt, phrase), occurrence, what="phrase")

    def held(self, spec: str, positions: list[int], n_text: int, requested: bool = True) -> list[int]:
        """Those of `positions` (the tokens of the word or phrase `spec`) that a text sequence of `n_text` tokens
        holds. A pipeline called with a `max_sequence_length` below a segment's length cuts the prompt's tokens to
        it (keeping the end token last where the tokenizer adds one), so a word beyond the limit gets no attention
        at all: that is a UsageError naming the word, its token position and the limit when the word was
        `requested`, and otherwise a logged warning (the positions left are returned)."""
        cut = [p for p in positions if self.is_cut(p, n_text)]
        if not cut:
            return positions
        seg = next((s for s in self.segments if s.offset <= cut[0] < s.offset + s.length), self.segments[-1])
        limit, last = n_text - seg.offset, max(cut) - seg.offset
        where = (f"{spec!r} is at token position {cut[0] - seg.offset} (counting from 0) of the prompt, "
                 f"beyond the limit of {limit} text tokens (max_sequence_length, the end token included), so the "
                 "model never sees it")
        if requested:
            raise UsageError(f"{where}; raise --max-sequence-length (max_sequence_length) to at least {last + 2}, or "
                             "shorten the prompt")
        kept = [p for p in positions if p not in cut]
        log.warning("%s; %s", where, "its map leaves out the cut tokens" if kept else "its map is empty")
        return kept

    def is_cut(self, position: int, n_text: int) -> bool:
        """Whether sequence position `position` was cut from a text sequence of `n_text` tokens (the last kept
        position of a cut segment holds its end token, not the prompt's token)."""
        for seg, count, closed in zip(self.segments, self._counts, self._closed):
            if seg.offset <= position < seg.offset + seg.length:
                limit = n_text - seg.offset
                return position - seg.offset >= (limit - 1 if count > limit and closed else limit)
        return position >= n_text

    def _positions_of(self, spec, matches, occurrence, what) -> list[int]:
        if not matches:
            raise UsageError(
                f"{what} {spec!r} is not in the prompt {self.prompt!r}. "
                f"The prompt's words are: {', '.join(w for w, _, _ in self.words())}; "
                f"its tokens are: {' '.join(self.token_strings)}"
            )
        if occurrence > len(matches):
            raise UsageError(
                f"{what} {spec!r}: asked for occurrence {occurrence} but the prompt has it {len(matches)} time(s)"
            )
        start, end = matches[occurrence - 1]
        positions = self.span_positions(start, end)
        if not positions:
            raise UsageError(
                f"{what} {spec!r} lies beyond the text encoder's token limit and was cut from the prompt; "
                "shorten the prompt or pick an earlier word"
            )
        return positions


class HeldWords:
    """Words' token positions in each prompt (`words[i]`: prompt i's words), and those a text sequence of `n_text`
    tokens holds (`PromptTokens.held`: a cut word is an error when `requested`, else a warning), found once per
    (prompt, text length)."""

    def __init__(self, prompts: list[PromptTokens], words: list[list[str]], requested: bool = True):
        self.prompts, self.words, self.requested = prompts, words, requested
        self.positions = [[p.word_positions(w) for w in ws] for p, ws in zip(prompts, words)]
        self._held: dict[tuple[int, int], list[list[int]]] = {}

    def __call__(self, prompt: int, n_text: int) -> list[list[int]]:
        """Each word's positions that a text of `n_text` tokens holds, in prompt `prompt` (the last prompt for a
        later index: rows beyond the prompts given repeat the last one)."""
        prompt = min(prompt, len(self.prompts) - 1)
        if (prompt, n_text) not in self._held:
            self._held[prompt, n_text] = [self.prompts[prompt].held(w, pos, n_text, self.requested)
                                          for w, pos in zip(self.words[prompt], self.positions[prompt])]
        return self._held[prompt, n_text]


def parse_occurrence(spec: str) -> tuple[str, int]:
    """(word, n) of a target written `word` (n = 1) or `word#n` (its n-th occurrence); a UsageError for a bad n."""
    word, sep, count = spec.partition("#")
    if not sep:
        return spec.strip(), 1
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"{spec!r}: write a repeated word's occurrence as word#N with N >= 1, e.g. dog#2")
    return word.strip(), int(count)
