"""Model specs for `--model`: what users load, and random-weight stand-ins for tests and timing.

- `builtin:shapes-unet`, `builtin:shapes-mmdit`: the small models trained on the shapes world, shipped in the package.
- a hub id (`stabilityai/stable-diffusion-2-base`) or a local diffusers folder: `DiffusionPipeline.from_pretrained`.
- `random:<family>-tiny` (sd15, sdxl, sd3, flux, flux2, flux2-klein, zimage, lumina2, hidream, qwenimage21): tiny
  configs, seconds on a CPU, for tests.
- `random:<family>`: the full-size denoiser architecture with random weights, for timing (flux2: FLUX.2 [dev],
  flux2-klein: FLUX.2 [klein] 4B, zimage: Z-Image, lumina2: Lumina-Image 2.0, hidream: HiDream-I1, qwenimage21:
  Qwen-Image 2.1). Text encoders and
  VAE are small (their cost is the same with or without attention control; the chat models' text encoders keep the
  layer count whose hidden states the pipeline reads, with tiny layers). Reduced depth:
  `random:flux?double=2&single=4`, `random:flux2?double=2&single=4`, `random:sd3?layers=4`, `random:zimage?layers=4`,
  `random:lumina2?layers=4`, `random:hidream?double=2&single=4`, `random:qwenimage21?layers=4`.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from .defaults import DEFAULT_MODEL
from .devices import DTYPES, checked_device, parse_dtype
from .errors import UsageError
from .offline_tokenizers import (
    clip_tokenizer,
    gemma_like_tokenizer,
    llama3_like_tokenizer,
    mistral3_like_tokenizer,
    qwen3_like_tokenizer,
    qwen3vl_like_processor,
    t5_like_tokenizer,
)
from .sampling import FOLDER_SETTINGS, SamplingConfig

BUILTIN_DIR = Path(__file__).parent / "builtin"
RANDOM_SPECS = ("sd15-tiny", "sdxl-tiny", "sd3-tiny", "flux-tiny", "flux2-tiny", "flux2-klein-tiny", "zimage-tiny",
                "lumina2-tiny", "hidream-tiny", "qwenimage21-tiny", "sd15", "sdxl", "sd3", "flux", "flux2",
                "flux2-klein", "zimage", "lumina2", "hidream", "qwenimage21")

def load_pipeline(spec: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A diffusers pipeline for a model spec (see the module doc), on `device` in `dtype`.

        pipe = attnctl.load_pipeline("builtin:shapes-unet")           # or a hub id, a folder, random:sd15-tiny
    """
    spec, dtype, seed = _checked_arguments(spec, device, dtype, seed)
    options = check_spec(spec)
    if spec.startswith("random:"):
        name = spec[len("random:"):].partition("?")[0]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            pipe = _RANDOM_BUILDERS[name.removesuffix("-tiny")](tiny=name.endswith("-tiny"), **options)
    else:
        pipe = _from_pretrained(str(model_dir(spec)) if spec.startswith("builtin:") else spec)
    pipe.set_progress_bar_config(disable=not _show_progress())
    pipe.to(device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe


def check_spec(spec: str) -> dict:
    """What can be known of a model spec without loading it, each fault a UsageError: a random spec's name and
    options (returned), a built-in model that exists, a local folder's model_index.json and attnctl.json (a hub id
    cannot be checked without the network)."""
    if spec.startswith("random:"):
        name, _, query = spec[len("random:"):].partition("?")
        if name not in RANDOM_SPECS:
            raise UsageError(f"unknown random model {name!r}; choose one of: "
                             + ", ".join(f"random:{s}" for s in RANDOM_SPECS))
        return _random_options(name, query)
    folder = model_dir(spec)
    if spec.startswith("builtin:") and not exists(folder / "model_index.json", "file"):
        known = sorted(p.name for p in BUILTIN_DIR.glob("*") if (p / "model_index.json").exists())
        raise UsageError(f"no built-in model {spec!r}; built-in models: {', '.join(known) or 'none installed'}")
    if exists(folder):
        if not exists(folder / "model_index.json"):
            raise UsageError(f"{spec} is not a diffusers pipeline folder (there is no model_index.json in it); give "
                             "a folder saved by `pipe.save_pretrained(folder)`, a hub id or builtin:NAME")
        _model_index(folder / "model_index.json")
        _model_settings(spec)
    return {}


def _checked_arguments(spec, device, dtype, seed) -> tuple[str, torch.dtype, int]:
    """load_pipeline's arguments, checked before anything loads: the spec (a string or a folder's path), the device,
    the dtype (a floating-point torch dtype or one of `DTYPES`' names) and the seed of random: weights."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"a model spec is a non-empty string (builtin:..., random:..., a hub id or a folder), not "
                         f"{spec!r}")
    checked_device(device)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype must be a floating-point torch dtype such as torch.float16 (or one of "
                         f"{', '.join(DTYPES)}), not {dtype!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise UsageError(f"seed must be a whole number from 0 to 2**64 - 1, not {seed!r}")
    return spec, dtype, int(seed)


def model_dir(spec: str) -> Path:
    """The folder a built-in model spec or a local folder's spec names (it may not exist)."""
    if spec.startswith("builtin:"):
        return BUILTIN_DIR / spec[len("builtin:"):]
    try:
        return Path(spec).expanduser()
    except RuntimeError as err:  # "~someone" of no known user
        raise UsageError(f"--model {spec!r}: {err}; give the folder's full path") from None


def exists(path: Path, kind: str = "any", what: str = "--model") -> bool:
    """Whether `path` exists (`kind` "file" or "dir": as one); a UsageError naming `what` (the flag that gave the
    path) where the system cannot even look (a name too long)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists()
    except OSError as err:
        shown = str(path) if len(str(path)) <= 80 else str(path)[:80] + "..."
        raise UsageError(f"{what} {shown!r}: {err.strerror}; give a shorter or valid path") from None


def json_object(path: Path, where: str, example: str) -> dict:
    """The JSON object in the file `path`; a UsageError naming `where` and showing `example` for a file that is
    not UTF-8 JSON holding an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text; rewrite it as JSON such as {example}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); write JSON "
                         f"such as {example}") from None
    except (ValueError, RecursionError) as e:  # numbers of thousands of digits, nesting thousands deep
        raise UsageError(f"{where} cannot be read as JSON ({type(e).__name__}: {str(e)[:100]}); write JSON such as "
                         f"{example}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a JSON object such as {example}, not a {type(value).__name__}")
    return value


def _model_settings(spec: str) -> dict:
    """The `attnctl.json` of a built-in model or local folder: pipeline-call defaults, and under "methods" the
    method options recommended for this model; {} when there is none. A file that is not a JSON object of known,
    valid settings is a UsageError naming the file, the setting and what it may be."""
    path = model_dir(spec) / "attnctl.json"
    if not exists(path, "file"):
        return {}
    where = f"{path} (the model folder's recommended settings)"
    settings = json_object(path, where, "{\"num_inference_steps\": 25, \"methods\": {}}")
    for key, value in settings.items():
        if key == "methods":
            _check_method_settings(value, where)
        elif key not in FOLDER_SETTINGS:
            raise UsageError(f"{where}: unknown setting {key!r}; it may set {', '.join(FOLDER_SETTINGS)} and "
                             "\"methods\"")
        else:  # the bounds of the flag that sets it, as the type the pipeline takes (25, not 25.0)
            try:
                if value is None:
                    raise UsageError("a setting must be a number; leave it out for the pipeline's default")
                settings[key] = getattr(SamplingConfig(**{FOLDER_SETTINGS[key]: value}), FOLDER_SETTINGS[key])
            except UsageError as e:
                raise UsageError(f"{where}: {key}: {e}") from None
    return settings


def _check_method_settings(methods, where: str) -> None:
    """The "methods" of attnctl.json: each a known method's options, built into its config to check them."""
    from .config import build
    from .methods.registry import METHODS

    if not isinstance(methods, dict):
        raise UsageError(f"{where}: \"methods\" must map method names to their options, such as {{\"regulation\": "
                         f"{{\"strength\": 1.0}}}}, not {methods!r}")
    for name, options in methods.items():
        if name not in METHODS:
            raise UsageError(f"{where}: unknown method {name!r} under \"methods\"; the methods are "
                             f"{', '.join(METHODS)}")
        if not isinstance(options, dict):
            raise UsageError(f"{where}: the options of {name!r} must be a JSON object of its config's fields, not "
                             f"{options!r}")
        try:
            build(METHODS[name].config, None, **options)
        except UsageError as e:
            raise UsageError(f"{where}: {name}: {e}") from None


RANDOM_OPTIONS = {"flux": ("double", "single"), "sd3": ("layers",), "flux2": ("double", "single"),
                  "flux2-klein": ("double", "single"), "zimage": ("layers",), "lumina2": ("layers",),
                  "hidream": ("double", "single"), "qwenimage21": ("layers",)}


def _random_options(name: str, query: str) -> dict[str, int]:
    """`double=2&single=4` of a random:flux spec, checked: known names, whole numbers from 1 to 64."""
    family = name.removesuffix("-tiny")
    known = RANDOM_OPTIONS.get(family, ())
    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            raise UsageError(f"random:{name} takes {', '.join(known) if known else 'no options'}, not {key!r} "
                             "(e.g. random:flux?double=2&single=4, random:sd3?layers=4)")
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 64:  # not "²": int() refuses it
            raise UsageError(f"random:{name}?{key}= must be a whole number from 1 to 64, not {value!r}")
        options[key] = int(value)
    return options


def sampling_defaults(spec: str) -> dict:
    """Pipeline-call defaults a model folder recommends (the built-in models were trained for a resolution, step
    count and guidance scale other than diffusers' defaults); {} when it has none."""
    return {k: v for k, v in _model_settings(spec).items() if k != "methods"}


def recommended_options(spec: str, method: str) -> dict:
    """Options of `method` (config field names) that a model folder recommends, e.g. Regulation's layers as the
    model's 16x16 sites; {} when it has none."""
    return dict(_model_settings(spec).get("methods", {}).get(method, {}))


def _show_progress() -> bool:
    return os.environ.get("ATTNCTL_PROGRESS", "1") != "0"


@contextlib.contextmanager
def _loading_bars():
    """diffusers' and transformers' loading bars turned off for the block when ATTNCTL_PROGRESS=0, as they were
    after it."""
    if _show_progress():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _model_index(path: Path) -> dict:
    """A pipeline folder's model_index.json, checked: a JSON object whose `_class_name` is a diffusers pipeline."""
    import diffusers

    where = f"{path} (the pipeline folder's index)"
    index = json_object(path, where, "{\"_class_name\": \"StableDiffusionPipeline\", ...} (save the pipeline again "
                        "with `pipe.save_pretrained(folder)`)")
    name = index.get("_class_name")
    if not isinstance(name, str):
        raise UsageError(f"{where} has no \"_class_name\" naming the pipeline class (such as "
                         "\"StableDiffusionPipeline\")")
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UsageError(f"{where} names {name!r}, which is not a diffusers pipeline class (diffusers "
                         f"{diffusers.__version__}); name one such as \"StableDiffusionPipeline\"")
    return index


def _from_pretrained(spec: str):
    from diffusers import DiffusionPipeline

    local = model_dir(spec)
    is_local = exists(local)  # a folder checked by `check_spec`
    # components saved as None (e.g. SD3 without T5) must be passed as None again, or diffusers refuses the folder
    index = _model_index(local / "model_index.json") if is_local else {}
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}
    try:
        with _loading_bars():
            pipe = DiffusionPipeline.from_pretrained(str(local) if is_local else spec, **absent)
    except Exception as err:  # a local folder's fault, whatever diffusers raises for it; a hub id's: below
        if is_local:
            raise UsageError(f"could not load the pipeline folder {spec} ({type(err).__name__}: {err}); check its "
                             "model_index.json and component folders against a folder saved by "
                             "`pipe.save_pretrained(...)`") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise UsageError(
            f"the weights of {spec!r} are not available: it is not a local folder and could not be fetched from the "
            f"Hugging Face Hub ({type(err).__name__}). Check the id and your network, or download it first with "
            f"`huggingface-cli download {spec}` and pass the folder. For a model that needs no download use "
            f"--model {DEFAULT_MODEL}, or a random:* spec for tests and timing."
        ) from None
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    return pipe


# --- random-weight pipelines ------------------------------------------------------------------------------------

def _clip_text(hidden: int, layers: int = 2, heads: int = 2, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection or hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_like_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval(), tokenizer


def _vae(latent_channels: int, levels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8,) * levels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1, norm_num_groups=8, sample_size=64, **extra,
    ).eval()


def _sd15(tiny: bool):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

    if tiny:
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        text = _clip_text(32)
    else:  # SD 1.5's UNet (the default UNet2DConditionModel config with SD 1.5's cross-attention width)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = _clip_text(768, layers=1, heads=12)
    return StableDiffusionPipeline(
        vae=_vae(4), text_encoder=text, tokenizer=clip_tokenizer(), unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(tiny: bool):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if tiny:
        h1, h2, time_dim = 16, 16, 8
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
            cross_attention_dim=h1 + h2, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + h2,
        )
    else:  # SDXL base's UNet
        h1, h2, time_dim = 768, 1280, 256
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=h1 + h2, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + h2,
        )
    tokenizer = clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(4), text_encoder=_clip_text(h1, layers=1 if not tiny else 2, heads=2),
        text_encoder_2=_clip_text(h2, layers=1 if not tiny else 2, heads=2, projection=h2), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet.eval(), scheduler=EulerDiscreteScheduler(steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )


def _sd3(tiny: bool, layers: int | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    if tiny:
        h1, h2, joint = 16, 16, 64
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=layers or 3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16, pooled_projection_dim=h1 + h2,
            pos_embed_max_size=32,
        )
        latent = 4
    else:  # SD3-medium's transformer
        h1, h2, joint = 768, 1280, 4096
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers or 24,
            attention_head_dim=64, num_attention_heads=24, joint_attention_dim=joint, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        )
        latent = 16
    t5, t5_tokenizer = _t5(joint)
    tokenizer = clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent, shift_factor=0.0609, scaling_factor=1.5305), text_encoder=_clip_text(h1, projection=h1),
        tokenizer=tokenizer, text_encoder_2=_clip_text(h2, projection=h2), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def _flux(tiny: bool, double: int | None = None, single: int | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if tiny:
        clip_hidden, joint, latent = 16, 32, 4
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=latent * 4, num_layers=double or 2, num_single_layers=single or 2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint,
            pooled_projection_dim=clip_hidden, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
    else:  # FLUX.1-dev's transformer
        clip_hidden, joint, latent = 768, 4096, 16
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19 if double is None else double,
            num_single_layers=38 if single is None else single, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=joint, pooled_projection_dim=clip_hidden, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    t5, t5_tokenizer = _t5(joint)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(latent, shift_factor=0.1159,
                                                                     scaling_factor=0.3611),
        text_encoder=_clip_text(clip_hidden), tokenizer=clip_tokenizer(), text_encoder_2=t5,
        tokenizer_2=t5_tokenizer, transformer=transformer.eval(),
    )


def _mistral3_text(hidden: int, layers: int):
    """A Mistral 3 encoder (FLUX.2 [dev]'s kind) of `layers` tiny layers (one head of 8) at width `hidden`, with a tiny
    Pixtral vision tower, and its offline tokenizer."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = mistral3_like_tokenizer()
    image_token = tokenizer.convert_tokens_to_ids("[IMG]")
    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16,
                num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=image_token)
    return Mistral3ForConditionalGeneration(config).eval(), tokenizer


def _qwen3_text(hidden: int, layers: int, causal_lm: bool):
    """A Qwen3 encoder (FLUX.2 [klein]'s Qwen3ForCausalLM, Z-Image's Qwen3Model) of `layers` tiny layers at width
    `hidden`, and its offline tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    tokenizer = qwen3_like_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval(), tokenizer


def _flux2(tiny: bool, double: int | None = None, single: int | None = None, klein: bool = False):
    """FLUX.2 [dev] (Flux2Pipeline: Mistral 3 text, guidance embedded) or [klein] 4B (Flux2KleinPipeline: Qwen3 text,
    classifier-free guidance as a second call)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    text_layers = 27 if klein else 30  # the pipelines read hidden states (9, 18, 27) and (10, 20, 30)
    if tiny:
        hidden, latent = 16, 4
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=latent * 4, num_layers=double or 2, num_single_layers=single or 2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * hidden, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=not klein)
        vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, latent_channels=latent, layers_per_block=1,
                                 norm_num_groups=8, sample_size=64)
    else:  # FLUX.2 [dev]'s transformer (8 double, 48 single blocks), [klein] 4B's (5, 20)
        hidden, latent = (2560 if klein else 5120), 32
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=latent * 4, num_layers=double or (5 if klein else 8),
            num_single_layers=single or (20 if klein else 48), attention_head_dim=128,
            num_attention_heads=24 if klein else 48, joint_attention_dim=3 * hidden, guidance_embeds=not klein)
        vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, latent_channels=latent, layers_per_block=1,
                                 norm_num_groups=8, sample_size=64)
    if klein:
        text, tokenizer = _qwen3_text(hidden, text_layers, causal_lm=True)
    else:
        text, tokenizer = _mistral3_text(hidden, text_layers)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    cls = Flux2KleinPipeline if klein else Flux2Pipeline
    return cls(scheduler=scheduler, vae=vae.eval(), text_encoder=text, tokenizer=tokenizer,
               transformer=transformer.eval())


def _gemma2_text(hidden: int, layers: int):
    """A Gemma 2 encoder (Lumina-Image 2.0's kind) of `layers` tiny layers (one key/value head of 8) at width `hidden`,
    and its offline tokenizer."""
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = gemma_like_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=layers,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    return Gemma2Model(config).eval(), tokenizer


def _lumina2(tiny: bool, layers: int | None = None):
    """Lumina-Image 2.0 (Lumina2Pipeline): Gemma 2 text after a system prompt, one single-stream DiT over
    [caption; image]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    if tiny:
        hidden, latent = 16, 4
        transformer = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=latent, hidden_size=32, num_layers=layers or 2,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
            axes_lens=(300, 32, 32), cap_feat_dim=hidden)
    else:  # Lumina-Image 2.0's transformer (26 layers of 2304, 24 query and 8 key/value heads; Gemma-2-2B's width)
        hidden, latent = 2304, 16
        transformer = Lumina2Transformer2DModel(in_channels=latent, num_layers=layers or 26, cap_feat_dim=hidden)
    text, tokenizer = _gemma2_text(hidden, 2)  # the pipeline reads the second-to-last hidden states
    return Lumina2Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent, shift_factor=0.1159, scaling_factor=0.3611), text_encoder=text, tokenizer=tokenizer)


def _zimage(tiny: bool, layers: int | None = None):
    """Z-Image (ZImagePipeline): Qwen3 text in a chat template, one single-stream DiT over [image; text]."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    if tiny:
        hidden, latent = 16, 4
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent, dim=32, n_layers=layers or 2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=hidden, axes_dims=[4, 6, 6],
            axes_lens=[1024, 64, 64])
    else:  # Z-Image's transformer (30 layers of 3840)
        hidden, latent = 2560, 16
        transformer = ZImageTransformer2DModel(in_channels=latent, n_layers=layers or 30, cap_feat_dim=hidden)
    text, tokenizer = _qwen3_text(hidden, 2, causal_lm=False)  # the pipeline reads the last layer's input
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(latent, shift_factor=0.1159,
                                                                      scaling_factor=0.3611),
        text_encoder=text, tokenizer=tokenizer, transformer=transformer.eval())


def _clip_long(hidden: int, projection: int):
    """A CLIP text encoder with a text projection and HiDream's 248 positions (its pipeline pads CLIP's tokens to
    max_sequence_length, 128 by default, past CLIP's usual 77)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=248, projection_dim=projection, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)
    return CLIPTextModelWithProjection(config).eval()


def _llama3_text(hidden: int, layers: int):
    """A Llama 3 causal LM (HiDream-I1's fourth encoder) of `layers` tiny layers (one head of 8) at width `hidden`,
    and its offline tokenizer: the pipeline reads every layer's hidden states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = llama3_like_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
                         attn_implementation="eager")  # the pipeline asks for attention weights, which SDPA lacks
    return LlamaForCausalLM(config).eval(), tokenizer


def _hidream(tiny: bool, double: int | None = None, single: int | None = None):
    """HiDream-I1 (HiDreamImagePipeline): two CLIP encoders' pooled embeddings, T5 and Llama 3 hidden states, a DiT
    of double-stream then single-stream blocks with mixture-of-experts feed-forwards."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel

    if tiny:
        t5_dim, llama_dim, clip_dims, latent, llama_depth = 16, 16, (8, 8), 4, 2
        n_double, n_single = double or 2, single or 2
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=latent, num_layers=n_double, num_single_layers=n_single, attention_head_dim=16,
            num_attention_heads=2, caption_channels=[t5_dim, llama_dim], text_emb_dim=sum(clip_dims),
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(8, 4, 4), max_resolution=(8, 8),
            llama_layers=_llama_layers(n_double + n_single, llama_depth))
    else:  # HiDream-I1's transformer (16 double, 32 single blocks of 2560; T5-XXL's and Llama-3.1-8B's widths)
        t5_dim, llama_dim, clip_dims, latent, llama_depth = 4096, 4096, (768, 1280), 16, 32
        n_double, n_single = 16 if double is None else double, 32 if single is None else single
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=latent, num_layers=n_double, num_single_layers=n_single, attention_head_dim=128,
            num_attention_heads=20, caption_channels=[t5_dim, llama_dim], text_emb_dim=sum(clip_dims),
            num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
            llama_layers=_llama_layers(n_double + n_single, llama_depth))
    t5, t5_tokenizer = _t5(t5_dim)
    llama, llama_tokenizer = _llama3_text(llama_dim, llama_depth)
    tokenizer = clip_tokenizer(248)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(latent, shift_factor=0.1159,
                                                                      scaling_factor=0.3611),
        text_encoder=_clip_long(16, clip_dims[0]), tokenizer=tokenizer, text_encoder_2=_clip_long(16, clip_dims[1]),
        tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer, text_encoder_4=llama,
        tokenizer_4=llama_tokenizer, transformer=transformer.eval())
    if tiny:  # the pipeline scales every size to the area of default_sample_size latents squared: 64x64 here
        pipe.default_sample_size = 8
    return pipe


def _qwen3vl_text(hidden: int, layers: int):
    """A Qwen3-VL model (Qwen-Image 2.1's text encoder) of `layers` tiny text layers (two query heads and one key/value
    head of 8) at width `hidden`, with a one-layer vision tower, and its offline processor."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = qwen3vl_like_processor()
    tokenizer = processor.tokenizer
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=14, out_hidden_size=hidden,
                  deepstack_visual_indexes=[0], num_position_embeddings=64)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in (
        ("image_token_id", "image_pad"), ("video_token_id", "video_pad"), ("vision_start_token_id", "vision_start"),
        ("vision_end_token_id", "vision_end"))}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen3VLForConditionalGeneration(config).eval(), processor


def _qwenimage21(tiny: bool, layers: int | None = None):
    """Qwen-Image 2.1 (QwenImage21Pipeline): Qwen3-VL text after a system message, one block-causal single-stream DiT
    over [text; image] whose text keys and values are cached after the first step."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    if tiny:
        hidden, latent = 16, 4
        transformer = QwenImage21Transformer2DModel(
            in_channels=latent, out_channels=latent, num_layers=layers or 2, attention_head_dim=16,
            num_attention_heads=2, context_in_dim=hidden, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    else:  # Qwen-Image 2.1's transformer (32 blocks of 4096; the text encoder's width)
        hidden, latent = 4096, 64
        transformer = QwenImage21Transformer2DModel(num_layers=layers or 32)
    text, processor = _qwen3vl_text(hidden, 2)  # the pipeline reads the last layer's input
    vae = AutoencoderKLQwenImage21(  # 16x spatial compression, as the pipeline assumes
        base_dim=8, decoder_base_dim=8, z_dim=latent, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False] * 4, latents_mean=[0.0] * latent, latents_std=[1.0] * latent)
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), vae=vae.eval(),
        text_encoder=text, processor=processor, transformer=transformer.eval())


def _llama_layers(blocks: int, depth: int) -> list[int]:
    """Which Llama layer's hidden states each block reads, as HiDream-I1 has them: layers 0, 1, ... in turn, then the
    last one for the blocks after."""
    return [min(i, depth - 1) for i in range(blocks)]


_RANDOM_BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "flux2": _flux2,
                    "flux2-klein": lambda tiny, **options: _flux2(tiny, klein=True, **options), "zimage": _zimage,
                    "lumina2": _lumina2, "hidream": _hidream, "qwenimage21": _qwenimage21}
