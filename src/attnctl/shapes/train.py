"""Train the shapes-world models from scratch on CPU (or CUDA) within a time budget.

    python -m attnctl.shapes.train --family unet  --out /tmp/shapes_out/unet  --minutes 80
    python -m attnctl.shapes.train --family mmdit --out /tmp/shapes_out/mmdit --minutes 80 --vae /tmp/shapes_out/unet/vae

``--family unet`` gives a ``StableDiffusionPipeline`` folder (epsilon prediction, cosine betas,
DPM-Solver++ sampler); ``--family mmdit`` a ``StableDiffusion3Pipeline`` folder (rectified flow,
FlowMatchEulerDiscreteScheduler). Without ``--vae`` the VAE is trained first, inside the budget.
Captions are dropped (replaced by the empty prompt) 10% of the time so classifier-free guidance works.
A usable pipeline folder is written to ``OUT/pipeline`` every ``--checkpoint-minutes`` and at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data, models
from .cli import add_train_arguments


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def image_batch(seeds, pair_fraction=data.TRAIN_PAIR_FRACTION) -> tuple[torch.Tensor, list[str]]:
    rendered = data.make_batch(seeds, split="train", pair_fraction=pair_fraction)
    return torch.from_numpy(data.images_to_array(rendered)), [r.caption for r in rendered]


def _cosine(frac: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, frac))))


# ----------------------------------------------------------------------------------------------
# VAE


def train_vae(out: str, minutes: float, device: str, seed: int = 0, batch: int = 32, lr: float = 1e-3):
    """Train the AutoencoderKL on rendered scenes; set scaling/shift factors; save to ``out``."""
    torch.manual_seed(seed)
    vae = models.build_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    budget, t0, step, seed_base = minutes * 60.0, time.time(), 0, 10_000_000 + seed * 1_000_000
    losses = []
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * _cosine(frac))
        x, _ = image_batch(range(seed_base + step * batch, seed_base + (step + 1) * batch), pair_fraction=0.5)
        x = x.to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"vae step {step} loss {np.mean(losses[-25:]):.4f} kl {kl.item():.4f} "
                f"({(time.time() - t0) / step:.2f} s/it)")
    vae.eval()
    with torch.no_grad():
        x, _ = image_batch(range(20_000_000, 20_000_512), pair_fraction=0.5)
        dists = [vae.encode(x[i:i + 64].to(device)).latent_dist for i in range(0, len(x), 64)]
        z = torch.cat([d.mean for d in dists])
        rec = torch.cat([vae.decode(z[i:i + 64]).sample for i in range(0, len(z), 64)]).cpu()
        zs = torch.cat([d.sample() for d in dists])  # what the denoisers are trained on
    shift, std = zs.mean().item(), zs.std().item()
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    err = (rec.clamp(-1, 1) - x).abs().mean().item() * 127.5
    log(f"vae done: {step} steps, latent mean {shift:.3f} std {std:.3f}, held-out L1 {err:.2f}/255")
    vae.to(torch.float16).save_pretrained(out)
    vae.to(torch.float32)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump({"steps": step, "batch": batch, "final_loss": float(np.mean(losses[-25:])),
                   "heldout_l1_255": err, "minutes": (time.time() - t0) / 60}, f, indent=1)
    return vae


# ----------------------------------------------------------------------------------------------
# Latents and text


@torch.no_grad()
def latent_cache(vae, tokenizer, n: int, device: str, seed: int = 0, batch: int = 128):
    """Encode ``n`` training scenes once: posterior mean/std and token ids."""
    means, stds, ids = [], [], []
    base = seed * 100_000_000
    t0 = time.time()
    for i in range(0, n, batch):
        x, caps = image_batch(range(base + i, base + min(n, i + batch)))
        d = vae.encode(x.to(device)).latent_dist
        means.append(d.mean.cpu())
        stds.append(d.std.cpu())
        ids.append(tokenize(tokenizer, caps))
    log(f"encoded {n} scenes in {time.time() - t0:.0f} s")
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def tokenize(tokenizer, captions) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class RepeatedLastTokenJointProcessor:
    """Joint attention where the last text token stands for ``repeats`` identical tokens.

    ``StableDiffusion3Pipeline`` without T5 appends ``max_sequence_length`` (default 256) zero
    embeddings; they stay identical through every block, so attending to 256 copies equals attending
    to one copy whose logit is raised by log(256). Training with one copy is exact and 4x cheaper.
    """

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(t):
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if attn.context_pre_only:
            return img, txt
        return img, attn.to_add_out(txt)


def sd3_text(text_encoder, text_encoder_2, ids, t5_tokens: int):
    """Prompt embeddings exactly as StableDiffusion3Pipeline.encode_prompt builds them (no T5)."""
    o1 = text_encoder(ids, output_hidden_states=True)
    o2 = text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), pooled


# ----------------------------------------------------------------------------------------------
# Denoisers


class EMA:
    def __init__(self, modules: dict[str, torch.nn.Module], decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.modules = modules
        self.steps = 0

    @torch.no_grad()
    def update(self):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, m in self.modules.items():
            for ps, p in zip(self.shadow[k].parameters(), m.parameters()):
                ps.lerp_(p.detach(), 1 - d)


def save_pipeline(family: str, folder: str, vae, parts: dict[str, torch.nn.Module], info: dict) -> None:
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    half = {k: copy.deepcopy(m).to("cpu", torch.float16) for k, m in parts.items() if k in ("unet", "transformer")}
    texts = {k: copy.deepcopy(m).to("cpu", torch.float32) for k, m in parts.items() if k.startswith("text")}
    vae16 = copy.deepcopy(vae).to("cpu", torch.float16)
    if family == "unet":
        pipe = models.assemble_unet_pipeline(vae16, texts["text_encoder"], half["unet"])
    else:
        pipe = models.assemble_mmdit_pipeline(vae16, texts["text_encoder"], texts["text_encoder_2"], half["transformer"])
    pipe.save_pretrained(tmp)
    for sub in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt too, for slow/older CLIPTokenizers
        if os.path.isdir(os.path.join(tmp, sub)):
            models.write_tokenizer_files(os.path.join(tmp, sub))
    with open(os.path.join(tmp, "shapes_training.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def train_denoiser(family: str, vae, out: str, minutes: float, device: str, seed: int = 0,
                   batch: int = 64, lr: float | None = None, n_scenes: int = 24_000,
                   checkpoint_minutes: float = 10.0, cfg_drop: float = 0.1):
    torch.manual_seed(seed)
    tokenizer = models.build_tokenizer()
    vae = vae.to(device).eval()
    cache = os.path.join(out, f"latents_{n_scenes}_{seed}.pt")
    if os.path.exists(cache):
        mean, std, ids = torch.load(cache)
        log(f"latents from {cache}")
    else:
        mean, std, ids = latent_cache(vae, tokenizer, n_scenes, device, seed)
        torch.save((mean, std, ids), cache)
    sf = vae.config.scaling_factor
    shift = vae.config.shift_factor if family == "mmdit" else 0.0
    empty = tokenize(tokenizer, [""])[0]

    if family == "unet":
        parts = {"unet": models.build_unet(), "text_encoder": models.build_text_encoder()}
        lr = lr or 8e-4
        from diffusers import DDPMScheduler

        sched = models.build_unet_scheduler()
        noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=sched.config.beta_schedule,
                                    prediction_type="epsilon")
        alphas = noise_sched.alphas_cumprod.to(device)
    elif family == "mmdit":
        parts = {"transformer": models.build_transformer(),
                 "text_encoder": models.build_text_encoder(with_projection=True),
                 "text_encoder_2": models.build_text_encoder(with_projection=True)}
        lr = lr or 5e-4
        parts["transformer"].set_attn_processor(RepeatedLastTokenJointProcessor(models.SD3_T5_LENGTH))
    else:
        raise ValueError(f"unknown family {family!r}")
    for m in parts.values():
        m.to(device).train()
    params = [p for m in parts.values() for p in m.parameters()]
    log(f"{family}: " + ", ".join(f"{k} {models.count_parameters(m) / 1e6:.2f}M" for k, m in parts.items()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(parts)
    budget, t0, step, losses = minutes * 60.0, time.time(), 0, []
    last_ckpt = t0
    gen = torch.Generator().manual_seed(seed + 1)
    folder = os.path.join(out, "pipeline")

    def checkpoint(final=False):
        shadow = ema.shadow
        if family == "mmdit":  # the saved model uses diffusers' own processor
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            shadow = dict(shadow)
            shadow["transformer"] = copy.deepcopy(shadow["transformer"])
            shadow["transformer"].set_attn_processor(JointAttnProcessor2_0())
        info = {"family": family, "steps": step, "batch": batch, "lr": lr, "minutes": (time.time() - t0) / 60,
                "loss_last_200": float(np.mean(losses[-200:])) if losses else None, "final": final,
                "n_scenes": n_scenes, "cfg_drop": cfg_drop, "pair_fraction": data.TRAIN_PAIR_FRACTION}
        save_pipeline(family, folder, vae, shadow, info)
        log(f"checkpoint -> {folder} (step {step})")

    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * _cosine(frac))
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        z = ((z - shift) * sf).to(device)
        tok = ids[idx].clone()
        tok[torch.rand(batch, generator=gen) < cfg_drop] = empty
        tok = tok.to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        if family == "unet":
            t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * z + (1 - a).sqrt() * noise
            cond = parts["text_encoder"](tok)[0]
            pred = parts["unet"](x_t, t, cond).sample
            loss = F.mse_loss(pred, noise)
        else:
            s = torch.sigmoid(torch.randn(batch, generator=gen)).to(device)  # logit-normal sigmas
            sv = s.view(-1, 1, 1, 1)
            x_t = (1 - sv) * z + sv * noise
            cond, pooled = sd3_text(parts["text_encoder"], parts["text_encoder_2"], tok, 1)
            pred = parts["transformer"](x_t, cond, pooled, s * 1000).sample
            loss = F.mse_loss(pred, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            el = time.time() - t0
            log(f"{family} step {step} loss {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{el / step:.2f} s/it, {el / 60:.1f}/{minutes:.0f} min")
        if time.time() - last_ckpt > checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint(final=True)
    return folder


# ----------------------------------------------------------------------------------------------
# Entry points


def run_training(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or f"shapes-{args.family}-run"
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32)
        log(f"using VAE from {args.vae}")
    else:
        vae_minutes = args.vae_minutes if args.vae_minutes is not None else 0.12 * args.minutes
        if args.vae_threads:
            torch.set_num_threads(args.vae_threads)
        vae = train_vae(os.path.join(out, "vae"), vae_minutes, args.device, args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
    remaining = args.minutes - (time.time() - t0) / 60.0
    folder = train_denoiser(args.family, vae, out, max(0.5, remaining - 1.0), args.device, args.seed,
                            batch=args.batch, lr=args.lr, n_scenes=args.scenes,
                            checkpoint_minutes=args.checkpoint_minutes)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {folder}")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnctl.shapes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    run_training(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
