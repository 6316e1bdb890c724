"""Family adapters' shared pieces: SD3's joint q/k/v and output projections, which the shapes trainer also uses."""

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from attnctl.families.sd3 import joint_out, joint_qkv
from attnctl.shapes import models


class SharedProjections:
    """JointAttnProcessor2_0 rebuilt from joint_qkv and joint_out."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        query, key, value, n_text = joint_qkv(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(query, key, value)
        return joint_out(attn, out, query.shape[2] - n_text, with_text=encoder_hidden_states is not None)


def test_sd3_projections_equal_diffusers_bit_for_bit():
    """Both block kinds (the last one is context_pre_only), outputs and gradients."""
    torch.manual_seed(0)
    transformer = models.build_transformer(num_layers=2)
    assert transformer.transformer_blocks[-1].attn.context_pre_only
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 900.0])
    text, pooled = torch.randn(2, 5, 128), torch.randn(2, transformer.config.pooled_projection_dim)
    results = []
    for processor in (JointAttnProcessor2_0(), SharedProjections()):
        transformer.set_attn_processor(processor)
        transformer.zero_grad()
        out = transformer(z, text, pooled, t).sample
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in transformer.parameters() if p.grad is not None]))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(got, want)
    assert len(got_grads) == len(want_grads) and all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
