"""How a pipeline is called, declared once: `SamplingConfig`. The command line's model and sampling flags, the page's
fields, eval's and tune's `--steps`/`--guidance`/`--device`, a model folder's recommended settings (`attnctl.json`)
and the Python API all take their names, meanings and bounds from these fields.

    SamplingConfig(steps=25, guidance=7.5, seed=3)     # None: the model's own default (its attnctl.json, else the
                                                       # pipeline's)
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import check, option
from .devices import checked_device, parse_dtype

MAX_SEED = 2**64 - 1  # a torch generator's seed is an unsigned 64-bit number
MAX_STEPS = 1000  # a scheduler has 1000 training timesteps: more steps only repeat them
MAX_SIDE = 4096  # beyond every supported model's resolution (FLUX.1 and SDXL are trained up to ~2048)
MAX_TEXT = 512  # the longest T5 text SD3 and FLUX take
MAX_IMAGES = 64  # images per prompt in one call; more is a loop, not a batch
# guidance scales far beyond any model's useful range overflow the guided prediction into an all-black image
MAX_GUIDANCE = 100.0


@dataclass
class SamplingConfig:
    """The pipeline call's settings and where it runs. Blank (None) settings take the model folder's recommendation
    (`attnctl.json`), else the pipeline's default."""

    cli_prefix = ""  # the flags are --seed, --steps, ...

    seed: int = option(0, "seed of the random generator (of the first image; a seed grid counts up from it)", low=0,
                       high=MAX_SEED)
    steps: int | None = option(None, "denoising steps", parse=int, low=1, high=MAX_STEPS,
                               shown_default="the model's usual count")
    guidance: float | None = option(None, "guidance scale (1 or less turns guidance off)", parse=float, low=0.0,
                                    high=MAX_GUIDANCE, shown_default="the pipeline's")
    height: int | None = option(None, "image height in pixels (a multiple of the model's latent patch)", parse=int,
                                low=8, high=MAX_SIDE, shown_default="the model's")
    width: int | None = option(None, "image width in pixels (a multiple of the model's latent patch)", parse=int,
                               low=8, high=MAX_SIDE, shown_default="the model's")
    num_images: int = option(1, "images per prompt", low=1, high=MAX_IMAGES)
    max_sequence_length: int | None = option(None, "text length in tokens, for pipelines that take it (SD3, FLUX, "
                                             "Chroma, Qwen-Image, Sana, PixArt)", parse=int, low=1, high=MAX_TEXT,
                                             shown_default="the pipeline's")
    device: str = option("cpu", "torch device: cpu, cuda, cuda:1, mps")
    dtype: str = option("float32", "weights and computation type: float32, float16 or bfloat16")

    def __post_init__(self):
        check(self)
        checked_device(self.device, "--device")
        parse_dtype(self.dtype)
        for name in ("seed", "steps", "height", "width", "num_images", "max_sequence_length"):
            if getattr(self, name) is not None:  # 25.0 is accepted as 25; the pipeline needs the int
                setattr(self, name, int(getattr(self, name)))

    def call_arguments(self) -> dict:
        """The pipeline's keyword arguments for the settings given (None ones are left to the model)."""
        names = {"steps": "num_inference_steps", "guidance": "guidance_scale", "height": "height", "width": "width",
                 "max_sequence_length": "max_sequence_length"}
        return {key: getattr(self, name) for name, key in names.items() if getattr(self, name) is not None}


# what a model folder's attnctl.json may set for the pipeline call: the pipeline's argument -> SamplingConfig field
FOLDER_SETTINGS = {"num_inference_steps": "steps", "guidance_scale": "guidance", "height": "height",
                   "width": "width", "max_sequence_length": "max_sequence_length"}
