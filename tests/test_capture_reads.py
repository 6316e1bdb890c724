"""Capture reads only what it keeps (issue 31, item 4): the conditional rows' image queries against the requested
words' text keys, with the full row log-sum-exp as the normaliser. Proven by recording every tensor an operator
creates inside `Capture.__call__`, and the maps are checked exact against float64 softmaxes, with key masks too."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnctl
from attnctl.attention import key_logits, key_probs, rows_lse

from conftest import call_kwargs, run, tiny_pipe

PROMPT = "a red cat and a blue dog"
# the fused attention pass that computes the call's output (which the pipeline uses) and, with it, the row LSE
FUSED = {"_scaled_dot_product_flash_attention_for_cpu"}


class Allocations(TorchDispatchMode):
    """Every tensor an operator creates, as (operator, shape, dtype, elements, bytes); views of an input and in-place
    results share an input's storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        held = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in held:
                self.made.append((func.overloadpacket.__name__, tuple(t.shape), t.dtype, t.numel(),
                                  t.numel() * t.element_size()))
        return out


def watched(capture_class):
    """`capture_class` recording, per call, the call's sizes and what its `__call__` created."""

    class Watched(capture_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = []

        def __call__(self, call):
            with Allocations() as mode:
                super().__call__(call)
            rows = call.step.cond_rows
            batch, heads, _, dim = call.q.shape
            self.seen.append(dict(batch=batch, rows=rows.stop - rows.start, heads=heads, dim=dim,
                                  image=call.q[:, :, call.image].shape[2], text=call.k[:, :, call.text].shape[2],
                                  made=mode.made))

    return Watched


def words_columns(session, words=("cat", "dog")) -> int:
    """How many text positions the words use in the (single) prompt."""
    return len({p for w in words for p in session.prompts[0].word_positions(w)})


def captured(pipe, family, capture_class=attnctl.Capture, **extra):
    capture = watched(capture_class)(["cat", "dog"])
    with attnctl.apply(pipe, capture, prompt=PROMPT) as session:
        run(pipe, PROMPT, **call_kwargs(family, steps=2, **extra))
        columns = words_columns(session)
    return capture, session, columns


def outside_attention(made):
    return [m for m in made if m[0] not in FUSED]


@pytest.mark.parametrize("family, extra", [("unet", {}), ("sd3", {}), ("flux", {})])
def test_capture_creates_nothing_for_unconditional_rows_or_unrequested_tokens(family, extra):
    """Per call, outside the fused attention pass the call needs anyway: no tensor of (image tokens × all text
    tokens), nothing larger than (conditional rows × heads × (image + words' tokens) × max(words' tokens, head_dim)),
    and the
    probabilities made are (conditional rows, heads, image tokens, words' tokens) float32. SD1.5 and SD3 run with
    CFG (2 rows, 1 conditional); FLUX has 1 row, so there only the text tokens are cut."""
    pipe = tiny_pipe(family)
    capture, session, columns = captured(pipe, family, **extra)
    assert len(capture.seen) == 2 * len(session.sites)
    for s in capture.seen:
        assert columns < s["text"]
        if family != "flux":
            assert (s["batch"], s["rows"]) == (2, 1)
        made = outside_attention(s["made"])
        assert not [m for m in made if m[1][-2:] == (s["image"], s["text"])], made
        bound = s["rows"] * s["heads"] * (s["image"] + columns) * max(columns, s["dim"])  # q·k of the kept
        assert max(m[3] for m in made) <= bound, made
        probs = (s["rows"], s["heads"], s["image"], columns)
        assert (probs, torch.float32) in [(m[1], m[2]) for m in made], made


def test_capture_reads_the_probabilities_a_method_set():
    """Behind a method that sets the probabilities it used (Regulation), the maps are those, not recomputed: equal
    to what `call.text_probs()` gives an observer after it, to float32 rounding of the sum."""
    pipe = tiny_pipe("unet")
    seen = {}

    class Record(attnctl.Controller):
        observer = True

        def __call__(self, call):
            seen.setdefault(call.site.name, []).append(call.text_probs()[call.step.cond_rows].double().mean(1))

    regulation = attnctl.Regulation(["cat", "dog"], edit_steps=2, iterations=2)
    capture = attnctl.Capture(["cat", "dog"])
    with attnctl.apply(pipe, regulation, capture, Record(), prompt=PROMPT) as session:
        run(pipe, PROMPT, **call_kwargs("unet", steps=2))
        positions = [session.prompts[0].word_positions(w) for w in ("cat", "dog")]
    assert len(seen) == len(session.sites)
    for name, calls in seen.items():
        probs = torch.stack(calls).mean(0)
        expected = torch.stack([probs[..., p].sum(-1) for p in positions], dim=1)
        torch.testing.assert_close(capture.maps()[name].reshape(expected.shape).double(), expected, rtol=1e-5,
                                   atol=1e-7)


def masked_reference(records, positions):
    """Per site: the float64 masked softmax's conditional-row maps, mean over heads and calls."""
    out = {}
    for name, calls in records.items():
        probs = []
        for q, k, bias, scale, rows, image, text in calls:
            p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale + bias.double(), dim=-1)
            probs.append(p[rows][:, :, image][..., text].mean(1))
        probs = torch.stack(probs).mean(0)
        out[name] = torch.stack([probs[..., p].sum(-1) for p in positions], dim=1)
    return out


@pytest.mark.parametrize("which", ["pixart", "chroma"])
def test_masked_maps_equal_the_float64_masked_softmax(which):
    """With a key mask (PixArt's −inf padding; Chroma's 0/1 bias, its negative prompt a second call), the kept rows'
    LSE comes from `rows_lse`; the maps equal the float64 masked softmax within 1e-6 (relative 1e-5)."""
    from test_family_support import PIXART_CALL, chroma, pixart

    pipe = pixart() if which == "pixart" else chroma()
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="latent",
                  **(PIXART_CALL if which == "pixart" else dict(max_sequence_length=32)))
    records = {}

    class Record(attnctl.Controller):
        observer = True
        handles_key_mask = True

        def __call__(self, call):
            if call.step.cond_rows.stop == call.step.cond_rows.start:  # Chroma's negative-prompt call
                return
            records.setdefault(call.site.name, []).append(
                (call.q, call.k, call.key_bias, call.scale, call.step.cond_rows, call.image, call.text))

    capture = attnctl.Capture(["cat", "dog"])
    with attnctl.apply(pipe, capture, Record(), prompt=PROMPT) as session:
        pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs)
        positions = [session.prompts[0].word_positions(w) for w in ("cat", "dog")]
    assert records and all(c[2] is not None for calls in records.values() for c in calls)  # every call masked
    expected = masked_reference(records, positions)
    assert expected.keys() == capture.maps().keys()
    for name, want in expected.items():
        torch.testing.assert_close(capture.maps()[name].reshape(want.shape).double(), want, rtol=1e-5, atol=1e-6)


def test_rows_lse_and_key_probs_equal_float64_for_kept_rows_and_columns():
    """The pieces on their own: `rows_lse` of some rows (with and without an additive key mask that has −inf and
    finite entries) and `key_probs` of a few columns against the float64 softmax, within 1e-6."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 50, 16), torch.randn(3, 4, 20, 16), torch.randn(3, 4, 20, 16)
    bias = torch.zeros(3, 1, 1, 20)
    bias[0, ..., 15:] = float("-inf")
    bias[2, ..., 3] = 1.0
    columns = torch.tensor([2, 3, 9])
    for mask in (None, bias):
        full = (q.double() @ k.double().transpose(-1, -2)) * 0.3 + (0 if mask is None else mask.double())
        rows = slice(1, 3)
        lse = rows_lse(q[rows], k[rows], v[rows], 0.3, None if mask is None else mask[rows])
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 50)
        torch.testing.assert_close(lse.double(), torch.logsumexp(full[rows], -1), rtol=0, atol=1e-5)
        col_bias = None if mask is None else mask[rows][..., columns]
        got = key_probs(q[rows], k[rows][:, :, columns], lse, 0.3, col_bias)
        torch.testing.assert_close(got.double(), torch.softmax(full[rows], -1)[..., columns], rtol=0, atol=1e-6)
    assert key_logits(q.double(), k.double()[:, :, :2]).dtype == torch.float64  # float64 stays float64
