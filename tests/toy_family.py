"""A toy denoiser, its pipeline and its family adapter: what docs/adding-a-family.md walks through. The family is
this module's `ToyFamily` plus one entry in `attnctl.families.FAMILIES` (tests/test_toy_family.py adds it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention

from attnctl.families.base import Family, argument
from attnctl.families.unet import UNetCrossProcessor
from attnctl.offline_tokenizers import clip_tokenizer
from attnctl.sites import AttentionSite
from attnctl.tokens import TextSegment

TEXT_LEN = 16


class ToyDenoiser(torch.nn.Module):
    """Latent pixels as tokens, one cross-attention over the prompt's embeddings, back to latent pixels."""

    def __init__(self, channels: int = 4, dim: int = 32, text_dim: int = 32):
        super().__init__()
        self.proj_in = torch.nn.Linear(channels, dim)
        self.time = torch.nn.Linear(1, dim)
        self.attn = Attention(query_dim=dim, cross_attention_dim=text_dim, heads=2, dim_head=dim // 2)
        self.proj_out = torch.nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, h, w = hidden_states.shape
        x = self.proj_in(hidden_states.flatten(2).transpose(1, 2))
        x = x + self.time(timestep.float().reshape(-1, 1, 1).expand(b, 1, 1) / 1000)
        x = x + self.attn(x, encoder_hidden_states=encoder_hidden_states)
        return self.proj_out(x).transpose(1, 2).reshape(b, c, h, w)


class ToyPipeline:
    """The least a text-to-image pipeline needs for attnctl: `transformer`, `scheduler`, `tokenizer` and a call
    that denoises latents from the prompt's embeddings."""

    def __init__(self, seed: int = 0):
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(seed)
        self.transformer = ToyDenoiser().eval()
        self.tokenizer = clip_tokenizer(TEXT_LEN)
        self.text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=TEXT_LEN, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
        self.scheduler = DDIMScheduler()

    def set_progress_bar_config(self, **config):
        self._progress_bar_config = config

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 3, generator=None, size: int = 8):
        ids = self.tokenizer(prompt, padding="max_length", max_length=TEXT_LEN, truncation=True,
                             return_tensors="pt").input_ids
        text = self.text_encoder(ids).last_hidden_state
        latents = torch.randn((len(ids), 4, size, size), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.transformer(latents, t, encoder_hidden_states=text)
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return SimpleNamespace(images=latents)


class ToyFamily(Family):
    """`ToyDenoiser`: one cross-attention site, image tokens one per latent pixel, text from a CLIP tokenizer."""

    name = "toy"
    denoiser_class = "ToyDenoiser"
    models = "the toy of docs/adding-a-family.md"
    known_processors = ("AttnProcessor2_0",)

    def discover(self, denoiser) -> list[AttentionSite]:
        """Its one cross-attention, at full resolution."""
        return [AttentionSite("attn", self.name, "cross", 0, 1, "attn", 1, None)]

    def make_processor(self, site, session, original):
        """diffusers' Attention with AttnProcessor2_0, as the UNets have it: the UNet family's processor computes
        the same."""
        return UNetCrossProcessor(site, session)

    def text_segments(self, pipe) -> list[TextSegment]:
        """The prompt's CLIP tokens, from position 0, `TEXT_LEN` long."""
        return [TextSegment(pipe.tokenizer, 0, TEXT_LEN)]

    def timestep(self, args, kwargs):
        """The second argument."""
        return argument(args, kwargs, "timestep", 1)

    def token_grid(self, denoiser, args, kwargs) -> tuple[int, int]:
        """The latents' (height, width)."""
        return tuple(self.latents(args, kwargs).shape[-2:])
