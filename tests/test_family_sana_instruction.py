"""Sana with any `complex_human_instruction` (issue 32, item 3): the pipeline puts the instruction before the prompt
and keeps the start token and the last max_sequence_length - 1 tokens of the whole (diffusers' `select_index`), so
where the prompt's words sit in the denoiser's text depends on a call argument the denoiser never sees. attnctl reads
the ids the text encoder is given and lays the prompts out as the call did, before any step.

Each check here finds the word's tokens on its own: the text encoder's input ids (a spy), the positions diffusers
keeps, and the tokenizer's ids of the word found among them; the maps are recomputed in float64 from the q, k and key
mask the attention used. Two stand-ins for Gemma's tokenizer: byte tokens (no merges) and byte tokens that merge a
space with the "a" after it, as Gemma's "▁" joins the word after it, so that the end of an instruction and the start
of the prompt become one token ("…Prompt: " + "a red dog": "Ġa")."""

import functools

import pytest
import torch

import attnctl
from attnctl import Capture, Regulation, UsageError
from attnctl.methods.attend_excite import AttendAndExcite
from test_family_support import SANA_CALL, Passes, gemma_like_tokenizer, sana

PROMPT = "a red dog and a grey cat"
LONG = PROMPT + " sitting on the green grass by a river"  # 63 bytes: cut by the text of 40 tokens
TEXT = SANA_CALL["max_sequence_length"]
KWARGS = dict(num_inference_steps=2, output_type="latent", **SANA_CALL)
DEFAULT = "default"  # the call leaves `complex_human_instruction` out: the pipeline's long default
INSTRUCTIONS = {  # id: the call's complex_human_instruction
    "default": DEFAULT,
    "own": ["Draw exactly what the user asks.", "User prompt: "],  # ends with a space, as the default does
    "own-no-space": ["Draw:"],  # the prompt right after a colon: no token joins them
    "None": None,
    "empty-list": [],
    "empty-text": [""],  # true, so an instruction: of empty text, which keeps the start token twice
}
MAP_TOLERANCE = 1e-5  # float32 maps of Capture against float64 ones recomputed from q and k


def merging_tokenizer():
    """Gemma-like (a start token, no end token, padding on the left) byte tokens with one merge: a space and the
    "a" after it are one token."""
    return gemma_like_tokenizer(merges=[("Ġ", "a")])


@functools.cache
def merging_sana():
    """The tiny Sana's transformer and VAE with the merging tokenizer and a Gemma-2 encoder of its vocabulary."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    base = sana()
    torch.manual_seed(1)
    tokenizer = merging_tokenizer()
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id))
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=encoder.eval(), vae=base.vae, transformer=base.transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPES = {"bytes": sana, "merging": merging_sana}


def call(instruction, **extra):
    return {**KWARGS, **({} if instruction is DEFAULT else {"complex_human_instruction": instruction}), **extra}


class Attention(attnctl.Controller):
    """An observer keeping, per attention call of the conditional rows, the site, q, k, scale and key bias."""

    observer = True
    handles_key_mask = True

    def attach(self, session):
        self.calls = []

    def __call__(self, call):
        rows = call.step.cond_rows
        bias = call.key_bias[rows] if call.key_bias is not None and call.key_bias.shape[0] > 1 else call.key_bias
        self.calls.append((call.site.name, call.q[rows], call.k[rows], call.scale, bias, call.grid))


def encoder_ids(pipe, run):
    """Runs `run`; the ids the text encoder was first given (the prompt's), as the denoiser's text keeps them:
    the start token and the last max_sequence_length - 1 (diffusers' `select_index`)."""
    seen = []
    spy = pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        result = run()
    finally:
        spy.remove()
    return seen[0][:, [0, *range(-TEXT + 1, 0)]], result


def word_tokens(pipe, text_ids, word):
    """Where the tokenizer's ids of `word` (alone, lowercased) lie in `text_ids`, found once."""
    want = pipe.tokenizer(word.lower(), add_special_tokens=False)["input_ids"]
    ids = text_ids.tolist()
    found = [i for i in range(len(ids) - len(want) + 1) if ids[i : i + len(want)] == want]
    assert len(found) == 1, (word, found)
    return list(range(found[0], found[0] + len(want)))


def reference_maps(attention, positions):
    """Per site: (1, h, w), the float64 probability the conditional row's image tokens give to `positions`, mean over
    heads and steps."""
    sums, counts = {}, {}
    for name, q, k, scale, bias, grid in attention.calls:
        logits = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
        probs = torch.softmax(logits, dim=-1)[..., positions].sum(-1).mean(dim=1)  # (rows, image tokens)
        sums[name] = sums.get(name, 0) + probs.reshape(probs.shape[0], *grid)
        counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


@pytest.mark.parametrize("prompt", [PROMPT, LONG], ids=["prompt", "cut-prompt"])
@pytest.mark.parametrize("instruction", list(INSTRUCTIONS.values()), ids=list(INSTRUCTIONS))
@pytest.mark.parametrize("tokens", list(PIPES))
def test_capture_is_exact_and_the_maps_are_those_of_the_words_tokens(tokens, instruction, prompt):
    """Whatever the instruction (and a prompt the text cuts): the image is the plain one bit for bit, and each word's
    map is the probability given to the tokens that hold the word in the text the denoiser is given."""
    pipe = PIPES[tokens]()
    plain = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **call(instruction)).images
    capture, attention = Capture(["dog", "cat"]), Attention()
    with attnctl.apply(pipe, capture, attention, prompt=prompt) as session:
        text_ids, image = encoder_ids(pipe, lambda: pipe(prompt=prompt, generator=torch.Generator().manual_seed(0),
                                                         **call(instruction)).images)
        placed = [session.prompts[0].word_positions(w) for w in ("dog", "cat")]
    assert torch.equal(image, plain)
    maps = capture.maps()
    for j, word in enumerate(("dog", "cat")):
        if word == "cat" and prompt == LONG:
            continue
        positions = word_tokens(pipe, text_ids[0], word)
        assert placed[j] == positions
        reference = reference_maps(attention, positions)
        assert set(maps) == set(reference) and len(reference) == 2
        for name in maps:
            assert (maps[name][:, j].double() - reference[name]).abs().max() < MAP_TOLERANCE


def test_the_merging_tokenizer_moves_the_words_with_the_instruction():
    """What the stand-in is for: where the instruction ends with a space the prompt's first "a" takes it (one
    token), so the prompt starts a token earlier than after an instruction whose last token stays its own; and the
    words sit elsewhere without an instruction than with the default."""
    pipe = merging_sana()
    where = {}
    for name in ("default", "own-no-space", "None"):
        with attnctl.apply(pipe, Capture(["dog"]), prompt=PROMPT) as session:
            text_ids, _ = encoder_ids(pipe, lambda n=name: pipe(prompt=PROMPT, **call(INSTRUCTIONS[n])))
            where[name] = session.prompts[0].word_positions("dog")
        assert where[name] == word_tokens(pipe, text_ids[0], "dog")
    assert pipe.tokenizer.convert_ids_to_tokens(int(text_ids[0, 1])) == "a"  # None: the prompt after <bos>
    assert where["default"] != where["own-no-space"]


@pytest.mark.parametrize("instruction", [INSTRUCTIONS["own-no-space"], None, [""]], ids=["own", "None", "empty-text"])
def test_regulation_edits_the_words_tokens(instruction):
    """Regulation acts, on the targets' tokens of the call: a plain call and one through the session (laid out from
    the call's argument before the controllers prepare it) give the same image, which is not the plain one."""
    pipe = merging_sana()
    plain = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **call(instruction)).images
    images = []
    for through_session in (False, True):
        regulation = Regulation(["dog", "cat"], edit_steps=2, iterations=2)
        with attnctl.apply(pipe, regulation, prompt=PROMPT) as session:
            run = session if through_session else pipe
            seeded = dict(generator=torch.Generator().manual_seed(0), **call(instruction))
            text_ids, image = encoder_ids(pipe, lambda r=run, s=seeded: r(prompt=PROMPT, **s).images)
            assert [session.prompts[0].word_positions(w) for w in ("dog", "cat")] == [
                word_tokens(pipe, text_ids[0], w) for w in ("dog", "cat")]
        images.append(image)
    assert torch.equal(images[0], images[1])
    assert float((images[0] - plain).abs().max()) > 1e-4


def test_attend_and_excite_through_the_session_takes_the_calls_instruction():
    """A method that moves the latents prepares the call through the session: the prompts are laid out for the
    call's instruction before, so the run is not taken for a plain call, and it acts."""
    pipe = merging_sana()
    kwargs = call(INSTRUCTIONS["own-no-space"])
    plain = pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    method = AttendAndExcite(["dog", "cat"], max_iter_to_alter=1, max_refinement_steps=1)
    with attnctl.apply(pipe, method, prompt=PROMPT) as session:
        image = session(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert session.prompts[0].segments[0].template == "Draw:{}"
    assert float((image - plain).abs().max()) > 1e-4


def test_calls_with_other_instructions_in_one_session_each_map_their_own_tokens():
    """One session, calls with three instructions: after each the prompts are laid out as it was, and Capture's
    maps (summed over the calls) are those of each call's tokens."""
    pipe = merging_sana()
    capture, attention = Capture(["dog"]), Attention()
    reference = {}
    with attnctl.apply(pipe, capture, attention, prompt=PROMPT) as session:
        for instruction in (INSTRUCTIONS["own-no-space"], None, DEFAULT):
            attention.calls = []  # this call's (attach, again where the call moves the words, also starts afresh)
            text_ids, _ = encoder_ids(pipe, lambda i=instruction: pipe(prompt=PROMPT, **call(i)))
            positions = word_tokens(pipe, text_ids[0], "dog")
            assert session.prompts[0].word_positions("dog") == positions
            for name, m in reference_maps(attention, positions).items():
                reference[name] = reference.get(name, 0) + m
    for name, m in capture.maps().items():
        assert (m[:, 0].double() - reference[name] / 3).abs().max() < MAP_TOLERANCE


def test_a_text_that_does_not_hold_the_prompt_is_refused_before_any_step():
    """The encoder's text must end with the prompt `apply` was given (or, cut, with its beginning): another prompt
    is refused at the first denoiser call, before any step, and the pipeline is left as it was."""
    pipe = merging_sana()
    before = dict(pipe.transformer.attn_processors)
    for prompt, instruction in (("a blue bird", None), ("a blue bird", DEFAULT), ("a red dog", ["Draw:"])):
        steps = Passes()
        with pytest.raises(UsageError) as err:
            with attnctl.apply(pipe, Capture(["dog"]), steps, prompt=PROMPT):
                pipe(prompt=prompt, **call(instruction))
        assert f"which does not end with the prompt attnctl.apply was given, {PROMPT!r}" in str(err.value)
        assert "pass the same prompt to both" in str(err.value)
        assert not steps.calls
        assert dict(pipe.transformer.attn_processors) == before
        assert not hasattr(pipe.text_encoder, "_diffusers_hook") and "forward" not in pipe.text_encoder.__dict__


def test_an_encoding_that_cannot_be_read_back_is_refused_before_any_step(monkeypatch):
    """Where the instruction read from the ids and the prompt, tokenized together, do not give the ids back (a
    tokenizer whose decoding is not its encoding's inverse), the call is refused: attnctl cannot place the words."""
    pipe = sana()
    tokenizer = type(pipe.tokenizer)
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda self, ids, **kw: decode(self, ids, **kw).replace("draw", "Draw"))
    steps = Passes()
    with pytest.raises(UsageError, match="cannot tell where the words of 'a red dog and a grey cat' sit in the text "
                                         "SanaPipeline's text encoder was given"):
        with attnctl.apply(pipe, Capture(["dog"]), steps, prompt=PROMPT):
            pipe(prompt=PROMPT, **call(["draw: "]))
    assert not steps.calls
