"""What every family adapter provides."""

from __future__ import annotations

from ..errors import UsageError
from ..sites import AttentionSite
from ..tokens import TextSegment


def argument(args, kwargs, name: str, position: int):
    """A forward argument given by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def remedy(processor: str) -> str:
    """What gives a site back a processor attnctl knows, from the name of the processor it has."""
    if "IPAdapter" in processor:
        return ("an IP-Adapter is loaded through a processor attnctl does not reproduce (it supports diffusers' "
                "IPAdapterAttnProcessor2_0 on UNets, SD3IPAdapterJointAttnProcessor2_0 on SD3 and "
                "FluxIPAdapterAttnProcessor on FLUX.1): call `pipe.unload_ip_adapter()`")
    if processor.startswith("Sliced"):
        return "attention slicing is on: call `pipe.disable_attention_slicing()`"
    if processor.startswith("XFormers"):
        return "xformers attention is on: call `pipe.disable_xformers_memory_efficient_attention()`"
    return ("it is a custom processor: remove it, putting back the processors the model had before it was set "
            "(`denoiser.set_attn_processor(saved)` with `saved = dict(denoiser.attn_processors)` taken before)")


def joint_block_sites(family: str, transformer, text_first: bool) -> list[AttentionSite]:
    """One joint site per `transformer_blocks[i].attn` (SD3, Qwen-Image)."""
    n = len(transformer.transformer_blocks)
    return [AttentionSite(f"transformer_blocks.{i}.attn", family, "joint", i, n, "joint", 1, text_first)
            for i in range(n)]


class Family:
    """How attnctl reads one kind of denoiser. A subclass must define `name`, `denoiser_class`, `models`,
    `known_processors`, and the methods that raise NotImplementedError here: `discover` (its attention sites),
    `make_processor` (a processor computing what the model's own does, handing q, k, v to the session),
    `text_segments` (where the prompt's tokens sit in the denoiser's text sequence), `timestep` and `token_grid`
    (read from a denoiser call's arguments). The rest have defaults that fit most pipelines: the batch layout of
    classifier-free and perturbed-attention guidance (`conditional_rows`), the latents argument (all of it the
    pipeline's latents: `split_latents`), a patch of 1, no text length, no mask. docs/adding-a-family.md walks
    through a toy family; `FAMILIES` lists them."""

    name: str = ""  # short name, as sites and messages show it
    denoiser_class: str = ""  # the diffusers class name of the denoiser it reads
    models: str = ""  # the model lines it covers, for messages ("SD3/3.5")
    known_processors: tuple[str, ...] = ()  # processor class names it reproduces exactly
    latents_name = "hidden_states"  # the denoiser's latent input (a UNet's "sample"), its first argument
    # classifier-free guidance as separate denoiser calls, the prompt's first (Chroma): later calls of a step are
    # unconditional
    separate_guidance_calls: bool = False
    # pipelines that batch classifier-free guidance without a `do_classifier_free_guidance` attribute (PixArt's): the
    # layout is read from the latents, which every guidance pass repeats
    guidance_from_latents: bool = False

    def image_key_mask(self, mask, image: slice):
        """Where the model's attention mask is per query: the mask the image queries see, (batch, 1 or heads, 1,
        keys); None where the mask is a key mask already (or the session should find out)."""
        return None

    def matches(self, denoiser) -> bool:
        """Whether this family reads `denoiser` (by default: its class is `denoiser_class`)."""
        return type(denoiser).__name__ == self.denoiser_class

    def discover(self, denoiser) -> list[AttentionSite]:
        """The attention sites over prompt tokens in `denoiser`, in the order the forward runs them."""
        raise NotImplementedError

    def make_processor(self, site: AttentionSite, session, original):
        """Our processor for `site`, computing what `original` (a known processor) computes."""
        raise NotImplementedError

    def check_processor(self, site: AttentionSite, processor) -> None:
        """A UsageError naming the remedy unless `processor` is one this family reproduces exactly."""
        name = type(processor).__name__
        if name not in self.known_processors:
            raise UsageError(
                f"{site.name} uses the attention processor {name}, which attnctl cannot reproduce exactly "
                f"(it knows {', '.join(self.known_processors)}); {remedy(name)}, then call attnctl.apply."
            )

    def text_segments(self, pipe) -> list[TextSegment]:
        """Where each text encoder's tokens of a prompt sit in the denoiser's text sequence (`tokens.TextSegment`),
        with the tokenizer that makes them."""
        raise NotImplementedError

    # the pipeline encodes the prompt as is with `pipe.tokenizer` into `pipe.text_encoder` first (CLIP): its first
    # encoder call of a pipeline call is checked against the prompt `apply` was given (`encoder_check`)
    encodes_prompt_as_is: bool = False

    def encoder_check(self, pipe, prompts):
        """(text encoder, check(args, kwargs)): the check is given the encoder's first call of each pipeline call
        (the prompts' own) and raises a UsageError when it does not encode the prompts `apply` was given (the
        methods would act on the wrong tokens), or where the pipeline's text sequence depends on a call argument
        the denoiser does not see (Sana's instruction). None where neither can be checked; a list of such pairs where
        several encoders' tokens reach the denoiser (HiDream-I1: T5's and Llama's). A check may answer with where the
        call puts the prompts' tokens: a list of `TextSegment`s, or a function of the denoiser call's (args, kwargs)
        giving one (or None); the session then lays the prompts out with it (`Session._lay_out`)."""
        if not self.encodes_prompt_as_is or getattr(pipe, "text_encoder", None) is None \
                or getattr(pipe, "tokenizer", None) is None:
            return None
        tokenizer = pipe.tokenizer
        wanted = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in prompts]

        def check(args, kwargs):
            ids = argument(args, kwargs, "input_ids", 0)
            if ids is None or ids.dim() != 2:
                return
            for i, row in enumerate(ids.tolist()):
                want = wanted[i % len(wanted)]
                part = want[: max(1, min(len(want), len(row) - 2))]  # what fits beside the start and end tokens
                if part and not _contains(row, part):
                    raise UsageError(
                        f"{type(pipe).__name__} was called with the prompt "
                        f"{tokenizer.decode(row, skip_special_tokens=True)!r}, but attnctl.apply was given "
                        f"{prompts[i % len(prompts)].prompt!r}, whose words the methods act on; pass the same prompt "
                        "to both")

        return pipe.text_encoder, check

    def lone_encoding_is_prompts(self, pipe, encoding: tuple, args, kwargs) -> bool:
        """Whether the text encoder's only call of a pipeline call (`encoding`: its (args, kwargs)) encoded the
        prompts, given the call's first denoiser call (`args`, `kwargs`); else it was the negative prompt's (the
        prompts given as embeddings, under guidance), which `encoder_check`'s check is not given, and the text the
        denoiser gets is judged by `check_text_layout` alone. By default: unless the pipeline does classifier-free
        guidance (`do_classifier_free_guidance`); a family whose pipeline runs guidance without saying so tells it
        from the call (Qwen-Image 2.1)."""
        return not getattr(pipe, "do_classifier_free_guidance", False)

    def call_text_segments(self, pipe, args, kwargs) -> list[TextSegment] | None:
        """Where a call of the pipeline with `args` and `kwargs`, made through the session, puts the prompts' tokens,
        where a call argument decides it (Sana's instruction): the session lays the prompts out with it before the
        controllers prepare the call. None (by default): where `text_segments` says."""
        return None

    def check_text_layout(self, args, kwargs, step, prompts) -> None:
        """At the first denoiser call of each pipeline call: a UsageError where the text the denoiser is given
        cannot hold the prompts' tokens where `text_segments` put them (embeddings made another way)."""

    # step inputs, read from the denoiser's forward arguments
    def timestep(self, args, kwargs):
        """The denoiser call's timestep argument, as the pipeline passes it (a tensor or number)."""
        raise NotImplementedError

    def timestep_scale(self, pipe) -> float:
        """What turns the scheduler's timesteps into the 0..1000 scale methods read (`StepState.timestep`): 1 for
        DDPM-style and flow-matching schedulers, whose timesteps already run up to 1000."""
        return 1.0

    def latents(self, args, kwargs):
        """The denoiser call's latent input: the transformers' `hidden_states` (a UNet's `sample`)."""
        return argument(args, kwargs, self.latents_name, 0)

    def split_latents(self, latents, args, kwargs):
        """The denoiser call's latent input `latents` as (the pipeline's own latents, the tokens the pipeline appends
        after them, which are not latents: FLUX.1 Kontext's context image), the second None where there are none.
        What moves the latents (`methods.latent_guidance`) moves the first and gives the denoiser the second as the
        pipeline built it."""
        return latents, None

    def replay_arguments(self, named: dict) -> dict:
        """A pipeline denoiser call's arguments by name, as a forward attnctl runs itself with them (a gradient
        forward, an extra prediction, for some of the call's rows or another prompt) must get them: as given by
        default; Qwen-Image 2.1 leaves out the pipeline's KV cache, which holds its run's rows of its prompt."""
        return named

    def latents_prediction(self, out, n_latents: int):
        """The latents' part of a denoiser output over more tokens than the latents (packed: batch, tokens,
        channels): its first `n_latents` by default (FLUX.1 Kontext's context image follows the latents); Qwen-Image
        2.1's text comes first."""
        return out[:, :n_latents]

    def batch_size(self, args, kwargs) -> int:
        """Rows in this denoiser call's batch."""
        return self.latents(args, kwargs).shape[0]

    def token_grid(self, denoiser, args, kwargs) -> tuple[int, int]:
        """(rows, columns) of image tokens at the denoiser's full resolution for this call."""
        raise NotImplementedError

    def patch_size(self, denoiser) -> int:
        """Latent pixels per image token along each side."""
        return 1

    def size_multiple(self, pipe, denoiser) -> int:
        """Image pixels per image token along each side: the token grid is the height and width over it."""
        return getattr(pipe, "vae_scale_factor", 8) * self.patch_size(denoiser)

    def size_step(self, pipe, denoiser) -> tuple[int, str]:
        """What the height and width in pixels must be multiples of, and why (for messages): a token's pixels
        (`size_multiple`) by default; more where the pipeline needs more (Qwen-Image 2.1: two tokens)."""
        return self.size_multiple(pipe, denoiser), "its latent patch in pixels"

    def check_size(self, pipe, denoiser, name: str, value: int) -> None:
        """A UsageError naming the nearest sizes the model can make where `value` (the height or width in pixels,
        `name` the option giving it) is not a multiple of `size_step`."""
        step, why = self.size_step(pipe, denoiser)
        if value % step:
            low = value // step * step
            sizes = f"{low} or {low + step}" if low else f"{step}"
            raise UsageError(f"{name} {value} must be a multiple of {step} for this model ({why}): e.g. {sizes}")

    def text_len(self, args, kwargs) -> int | None:
        """Joint-attention models: the number of text tokens in the joint sequence; None where text is a separate
        cross-attention input."""
        return None

    def conditional_rows(self, pipe, args, kwargs, context: str | None, call_of_step: int, n_prompts: int) -> slice:
        """The rows of this denoiser call's batch that are conditioned on the prompt, from how the pipeline lays out
        its guidance: classifier-free guidance batched as [negative, prompt] (the second half), perturbed-attention
        guidance as [negative,] prompt, perturbed prompt, separate guidance calls (`separate_guidance_calls`: the
        prompt's call first), or an unconditional call (diffusers' cache `context` "uncond", or an extra guidance
        pass: `guidance_pass`), which has none. `call_of_step`: how many denoiser calls this step made before this
        one; `n_prompts`: the prompts the controllers were given."""
        batch = self.batch_size(args, kwargs)
        cfg = getattr(pipe, "do_classifier_free_guidance", None)
        pag = getattr(pipe, "do_perturbed_attention_guidance", False)
        if cfg is None:
            cfg = self.guidance_from_latents and _repeated(self.latents(args, kwargs), 3 if pag else 2, n_prompts)
        if context == "uncond" or self.guidance_pass(args, kwargs):
            return slice(0, 0)
        if self.separate_guidance_calls and cfg:
            return slice(0, batch) if call_of_step == 0 else slice(0, 0)
        if pag and batch % (3 if cfg else 2) == 0:
            rows = batch // (3 if cfg else 2)
            return slice(rows, 2 * rows) if cfg else slice(0, rows)
        if cfg and batch % 2 == 0:
            return slice(batch // 2, batch)
        return slice(0, batch)

    def guidance_pass(self, args, kwargs) -> bool:
        """Whether this denoiser call is an extra guidance pass of the step (SD3.5's skip-layer guidance), which
        methods leave alone and observers do not count as conditional, like an unconditional pass."""
        return False


def _contains(row: list[int], part: list[int]) -> bool:
    """Whether token ids `part` occur in `row` as a run."""
    n = len(part)
    return any(row[k:k + n] == part for k in range(len(row) - n + 1))


def _repeated(latents, passes: int, n_prompts: int) -> bool:
    """Whether the batch is `passes` equal chunks, each holding every prompt's rows (a pipeline that runs its
    guidance passes on the same latents)."""
    import torch

    if latents.shape[0] % (passes * max(1, n_prompts)):
        return False
    chunks = latents.chunk(passes)
    return all(torch.equal(chunks[0], c) for c in chunks[1:])


class LatentImageFamily(Family):
    """A family whose denoiser takes the latent image as `hidden_states` (batch, channels, H, W) and cuts it into
    `config.patch_size` patches (SD3, PixArt)."""

    def patch_size(self, denoiser) -> int:
        """The denoiser's `config.patch_size`."""
        return denoiser.config.patch_size

    def token_grid(self, denoiser, args, kwargs) -> tuple[int, int]:
        """The latent `hidden_states`' height and width, each over the patch size."""
        h, w = argument(args, kwargs, "hidden_states", 0).shape[-2:]
        p = self.patch_size(denoiser)
        return h // p, w // p
