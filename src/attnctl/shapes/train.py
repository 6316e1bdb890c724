"""Train the shapes-world models on CPU (or CUDA), in one run or in several that resume.

    attnctl shapes train --family unet  --out runs/unet  --steps 6000 --minutes 80
    attnctl shapes train --family unet  --out runs/unet  --steps 6000 --minutes 80 --resume   # goes on
    attnctl shapes train --family mmdit --out runs/mmdit --init builtin:shapes-mmdit            # warm start

``--family unet`` gives a ``StableDiffusionPipeline`` folder (epsilon prediction, cosine betas,
DPM-Solver++ sampler); ``--family mmdit`` a ``StableDiffusion3Pipeline`` folder (rectified flow,
FlowMatchEulerDiscreteScheduler). Without ``--vae`` the VAE is trained first, inside the budget.
Captions are dropped (replaced by the empty prompt) 10% of the time so classifier-free guidance works.
A usable pipeline folder is written to ``OUT/pipeline`` every ``--checkpoint-minutes`` and at the end.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import check, option
from ..errors import UsageError
from ..families.sd3 import joint_out, joint_qkv
from . import data, models


def log(msg: str) -> None:
    """A timestamped progress line on stdout (training runs for hours; the log is how one follows it)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def image_batch(seeds) -> tuple[torch.Tensor, list[str]]:
    """The training scenes of `seeds` as images (batch, 3, 64, 64) in [-1, 1] and their captions."""
    rendered = data.make_batch(seeds, split="train")
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
        x, _ = image_batch(range(seed_base + step * batch, seed_base + (step + 1) * batch))
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
        x, _ = image_batch(range(20_000_000, 20_000_512))
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
    """Token ids of `captions`, padded to the tokenizer's length (batch, length)."""
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
        q, k, v, _ = joint_qkv(attn, hidden_states, encoder_hidden_states)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        return joint_out(attn, out, hidden_states.shape[1], with_text=True)


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
    """An exponential moving average of the modules' weights (`shadow`), the weights a checkpoint saves."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
        self.modules = modules
        self.steps = 0

    @torch.no_grad()
    def update(self):
        """One step of the average, with a warm-up: the decay grows from 0.1 to `decay`."""
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, m in self.modules.items():  # one fused update per module: on a GPU a loop per tensor is launch-bound
            torch._foreach_lerp_(list(self.shadow[k].parameters()), [p.detach() for p in m.parameters()], 1 - d)


class EpsilonUNet:
    """The UNet family's objective: epsilon prediction on the cosine schedule its sampler uses."""

    lr = 8e-4
    denoiser = "unet"

    def __init__(self, device):
        from diffusers import DDPMScheduler

        self.parts = {"unet": models.build_unet(), "text_encoder": models.build_text_encoder()}
        betas = models.build_unet_scheduler().config.beta_schedule
        noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule=betas, prediction_type="epsilon")
        self.alphas = noise.alphas_cumprod.to(device)

    @staticmethod
    def latent_shift(vae) -> float:
        """What is subtracted from the VAE's latents before scaling: nothing for the UNet."""
        return 0.0

    def loss(self, parts, z, tok, noise, gen):
        """Epsilon-prediction MSE at uniform timesteps."""
        t = torch.randint(0, 1000, (z.shape[0],), generator=gen).to(z.device)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        return F.mse_loss(parts["unet"](x_t, t, parts["text_encoder"](tok)[0]).sample, noise)

    @staticmethod
    def for_saving(parts):
        """The parts as saved: as trained."""
        return parts

    @staticmethod
    def assemble(vae, parts):
        """A StableDiffusionPipeline of the parts."""
        return models.assemble_unet_pipeline(vae, parts["text_encoder"], parts["unet"])


class FlowMMDiT:
    """The MMDiT family's objective: rectified flow (velocity noise - x0) at logit-normal sigmas."""

    lr = 5e-4
    denoiser = "transformer"

    def __init__(self, device):
        self.parts = {"transformer": models.build_transformer(),
                      "text_encoder": models.build_text_encoder(with_projection=True),
                      "text_encoder_2": models.build_text_encoder(with_projection=True)}
        self.parts["transformer"].set_attn_processor(RepeatedLastTokenJointProcessor(models.SD3_T5_LENGTH))

    @staticmethod
    def latent_shift(vae) -> float:
        """The VAE's shift factor, as SD3 pipelines subtract it."""
        return vae.config.shift_factor

    def loss(self, parts, z, tok, noise, gen):
        """Velocity MSE at logit-normal sigmas, with the pipeline's text embeddings (CLIP only, T5 as zeros)."""
        s = torch.sigmoid(torch.randn(z.shape[0], generator=gen)).to(z.device)
        sv = s.view(-1, 1, 1, 1)
        x_t = (1 - sv) * z + sv * noise
        cond, pooled = sd3_text(parts["text_encoder"], parts["text_encoder_2"], tok, 1)
        return F.mse_loss(parts["transformer"](x_t, cond, pooled, s * 1000).sample, noise - z)

    @staticmethod
    def for_saving(parts):
        """The saved transformer uses diffusers' own processor."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        parts = dict(parts)
        parts["transformer"] = copy.deepcopy(parts["transformer"])
        parts["transformer"].set_attn_processor(JointAttnProcessor2_0())
        return parts

    @staticmethod
    def assemble(vae, parts):
        """A StableDiffusion3Pipeline of the parts (no T5)."""
        return models.assemble_mmdit_pipeline(vae, parts["text_encoder"], parts["text_encoder_2"], parts["transformer"])


OBJECTIVES = {"unet": EpsilonUNet, "mmdit": FlowMMDiT}


def save_pipeline(objective, folder: str, vae, parts: dict[str, torch.nn.Module], info: dict) -> None:
    """`parts` as a diffusers pipeline folder (the denoiser in float16), with `info` as shapes_training.json;
    written beside and then moved over `folder`, so a stopped run never leaves half a folder."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    saved = {k: copy.deepcopy(m).to("cpu", torch.float16 if k == objective.denoiser else torch.float32)
             for k, m in objective.for_saving(parts).items()}
    pipe = objective.assemble(copy.deepcopy(vae).to("cpu", torch.float16), saved)
    pipe.save_pretrained(tmp)
    for sub in ("tokenizer", "tokenizer_2"):  # vocab.json + merges.txt too, for slow/older CLIPTokenizers
        if os.path.isdir(os.path.join(tmp, sub)):
            models.write_tokenizer_files(os.path.join(tmp, sub))
    with open(os.path.join(tmp, "shapes_training.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def init_from(parts: dict[str, torch.nn.Module], folder: str) -> None:
    """Copy every tensor of a saved pipeline whose name and shape match into `parts` (a changed patch size or
    width leaves those tensors at their fresh values; the log names them)."""
    from safetensors.torch import load_file

    for name, module in parts.items():
        files = sorted(glob.glob(os.path.join(folder, name, "*.safetensors")))
        if not files:
            log(f"init: {folder} has no {name}; it starts fresh")
            continue
        saved = {k: v for f in files for k, v in load_file(f).items()}
        own = module.state_dict()
        same = {k: v.to(own[k].dtype) for k, v in saved.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(same, strict=False)
        fresh = sorted(set(own) - set(same))
        log(f"init: {name} takes {len(same)}/{len(own)} tensors from {folder}"
            + (f"; fresh: {', '.join(fresh[:6])}{' …' if len(fresh) > 6 else ''}" if fresh else ""))


def train_denoiser(family: str, vae, out: str, minutes: float, device: str, seed: int = 0,
                   batch: int = 64, lr: float | None = None, n_scenes: int = 24_000, total_steps: int = 6000,
                   checkpoint_minutes: float = 10.0, cfg_drop: float = 0.1, init: str | None = None,
                   resume: bool = False, stop_at: int | None = None):
    """Train for at most `minutes` of this run, up to `total_steps` in all; with `resume` continue from the state
    saved in `out` (weights, EMA, optimiser, step, random state); `stop_at` ends this run at that step. The learning
    rate follows the step count (warm-up, then cosine to 10% at `total_steps`), so a training split into several runs
    follows the same schedule."""
    torch.manual_seed(seed)
    tokenizer = models.build_tokenizer()
    vae = vae.to(device).eval()
    counts = "-".join(f"{c:g}" for c in data.TRAIN_COUNTS)
    cache = os.path.join(out, f"latents_{n_scenes}_{seed}_{counts}.pt")
    if os.path.exists(cache):
        mean, std, ids = torch.load(cache)
        log(f"latents from {cache}")
    else:
        mean, std, ids = latent_cache(vae, tokenizer, n_scenes, device, seed)
        torch.save((mean, std, ids), cache)
    sf, shift = vae.config.scaling_factor, OBJECTIVES[family].latent_shift(vae)
    empty = tokenize(tokenizer, [""])[0]

    objective = OBJECTIVES[family](device)
    parts = objective.parts
    lr = lr or objective.lr
    state_path = os.path.join(out, "state.pt")
    if init and not (resume and os.path.exists(state_path)):
        init_from(parts, init)
    for m in parts.values():
        m.to(device).train()
    params = [p for m in parts.values() for p in m.parameters()]
    log(f"{family}: " + ", ".join(f"{k} {models.count_parameters(m) / 1e6:.2f}M" for k, m in parts.items()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(parts)
    step, losses, gen, spent = 0, [], torch.Generator().manual_seed(seed + 1), 0.0
    if resume and os.path.exists(state_path):
        state = read_state(state_path, family)
        try:
            for k, m in parts.items():
                m.load_state_dict(state["parts"][k])
                ema.shadow[k].load_state_dict(state["ema"][k])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # tensors of another shape or count
            raise UsageError(f"{state_path} does not fit the {family} models this version trains ({err}); delete "
                             "it to start afresh, or drop --resume") from None
        step, losses, spent, ema.steps = state["step"], state["losses"], state["minutes"], state["step"]
        gen.set_state(state["generator"])
        log(f"resumed from {state_path} at step {step} ({spent:.0f} min trained before)")
    elif resume:
        log(f"--resume: no {state_path} yet, starting")
    t0, last_ckpt, start_step, pending = time.time(), time.time(), step, []
    budget = minutes * 60.0
    folder = os.path.join(out, "pipeline")

    def read_losses():  # the losses of the steps since the last read, from the device in one copy
        if pending:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()

    def checkpoint(final=False):
        read_losses()
        total = spent + (time.time() - t0) / 60
        info = {"family": family, "steps": step, "total_steps": total_steps, "batch": batch, "lr": lr,
                "minutes": total, "loss_last_200": float(np.mean(losses[-200:])) if losses else None,
                "final": final, "n_scenes": n_scenes, "cfg_drop": cfg_drop, "object_counts": data.TRAIN_COUNTS,
                "init": init}
        save_pipeline(objective, folder, vae, ema.shadow, info)
        torch.save({"parts": {k: m.state_dict() for k, m in parts.items()},
                    "ema": {k: m.state_dict() for k, m in ema.shadow.items()}, "optimizer": opt.state_dict(),
                    "step": step, "losses": losses[-1000:], "minutes": total, "generator": gen.get_state()},
                   state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)
        log(f"checkpoint -> {folder} and {state_path} (step {step}/{total_steps})")

    stop = _stop_on_signal()
    try:
        last = min(total_steps, stop_at or total_steps)
        first = step  # at least one step a run: a run that trains nothing would end "done" with nothing done
        while step < last and (step == first or time.time() - t0 < budget) and not stop:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * _cosine(step / total_steps))
            idx = torch.randint(0, len(mean), (batch,), generator=gen)
            z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
            z = ((z - shift) * sf).to(device)
            tok = ids[idx].clone()
            tok[torch.rand(batch, generator=gen) < cfg_drop] = empty
            noise = torch.randn(z.shape, generator=gen).to(device)
            loss = objective.loss(parts, z, tok.to(device), noise, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.update()
            pending.append(loss.detach())  # read back every 50 steps: a read per step would sync the GPU each step
            step += 1
            if step % 50 == 0 or step == last:
                read_losses()
                el = time.time() - t0
                log(f"{family} step {step}/{total_steps} loss {np.mean(losses[-50:]):.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {el / (step - start_step):.2f} s/it, "
                    f"{el / 60:.1f}/{minutes:.0f} min")
            if time.time() - last_ckpt > checkpoint_minutes * 60:
                checkpoint()
                last_ckpt = time.time()
    finally:  # also on Ctrl-C or a stopped session: the next --resume starts from here
        checkpoint(final=step >= total_steps)
    return folder


# ----------------------------------------------------------------------------------------------
# Entry points


def _stop_on_signal() -> list:
    """A list that becomes non-empty when SIGTERM or SIGINT arrives, so that training stops after its current step
    and writes its checkpoint (a session or job scheduler ending the process, Ctrl-C)."""
    import signal

    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda number, frame: stop.append(number))
        except ValueError:  # not the main thread
            pass
    return stop


STATE_KEYS = ("parts", "ema", "optimizer", "step", "losses", "minutes", "generator")


def read_state(path: str, family: str) -> dict:
    """The training state `train_denoiser` wrote to `path` (OUT/state.pt) for a `family` training; a UsageError
    naming the file and the fix when it cannot be read, is not such a state, or is another family's."""
    fix = "delete it to start afresh, or drop --resume"
    try:
        state = torch.load(path, weights_only=False)
    except OSError as err:
        raise UsageError(f"--resume: {path} cannot be read ({err.strerror or err}); {fix}") from None
    except Exception as err:  # a truncated or foreign file: torch and pickle raise many kinds
        raise UsageError(f"--resume: {path} is not a training state that attnctl wrote (corrupt or truncated? "
                         f"{type(err).__name__}: {err}); {fix}") from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS) or not isinstance(state["parts"], dict):
        raise UsageError(f"--resume: {path} is not a training state that attnctl wrote (it needs "
                         f"{', '.join(STATE_KEYS)}); {fix}")
    other = next((f for f, o in OBJECTIVES.items() if f != family and o.denoiser in state["parts"]), None)
    if other is not None:
        raise UsageError(f"--resume: {path} is the state of a --family {other} training, and this is --family "
                         f"{family}; give --family {other}, or another --out for the {family} training")
    return state


def _folder(spec: str, flag: str) -> str:
    """A pipeline or component folder: a path, or builtin:NAME for a shipped model; a UsageError naming `flag`
    when it is no folder."""
    from ..models import BUILTIN_DIR

    folder = str(BUILTIN_DIR / spec[len("builtin:"):]) if spec.startswith("builtin:") else spec
    if not os.path.isdir(folder):
        what = "does not exist" if not os.path.exists(folder) else "is not a folder"
        raise UsageError(f"{flag} {spec!r} {what}; give a pipeline folder (such as OUT/pipeline of an earlier "
                         "training) or builtin:shapes-unet / builtin:shapes-mmdit")
    return folder


def _init_folder(spec: str, family: str) -> str:
    """The --init pipeline folder, which must hold the weights of `family`'s denoiser (else none of its tensors
    would be taken): a UsageError naming the folder, or the two families."""
    folder = _folder(spec, "--init")
    denoiser = OBJECTIVES[family].denoiser
    if glob.glob(os.path.join(glob.escape(folder), denoiser, "*.safetensors")):
        return folder
    other = next((f for f, o in OBJECTIVES.items()
                  if f != family and glob.glob(os.path.join(glob.escape(folder), o.denoiser, "*.safetensors"))), None)
    if other is not None:
        raise UsageError(f"--init {spec!r} is a --family {other} pipeline (it has {OBJECTIVES[other].denoiser}/, no "
                         f"{denoiser}/), and this is --family {family}: none of its denoiser's tensors would fit; "
                         f"give --family {other}, or an --init of the {family} family")
    raise UsageError(f"--init {spec!r} holds no {denoiser} weights ({denoiser}/*.safetensors); give a --family "
                     f"{family} pipeline folder (such as OUT/pipeline of an earlier training, with vae/ and "
                     f"{denoiser}/) or builtin:shapes-{family}")


def _vae_folder(folder: str, flag: str, spec: str) -> str:
    """The VAE folder of `folder` (its vae/ subfolder, or itself): a UsageError naming `flag` unless it holds an
    AutoencoderKL's config.json and weights."""
    if os.path.isdir(os.path.join(folder, "vae")):
        folder = os.path.join(folder, "vae")
    try:
        with open(os.path.join(folder, "config.json")) as f:
            kind = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        kind = None
    weights = glob.glob(os.path.join(glob.escape(folder), "diffusion_pytorch_model*.safetensors")) + \
        glob.glob(os.path.join(glob.escape(folder), "diffusion_pytorch_model*.bin"))
    if kind != "AutoencoderKL" or not weights:
        raise UsageError(f"{flag} {spec!r} holds no VAE: give a VAE folder (config.json of an AutoencoderKL and "
                         "diffusion_pytorch_model.safetensors), a pipeline folder with such a vae/ folder, or "
                         "builtin:shapes-unet / builtin:shapes-mmdit")
    return folder


def _load_vae(folder: str):
    from diffusers import AutoencoderKL

    log(f"using the VAE of {folder}")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)


@dataclass
class TrainConfig:
    """Every option of `attnctl shapes train` (its flags are these fields'): what to train, for how long, from what.
    `steps` counts denoiser steps over every resumed run (the learning-rate schedule follows them); `minutes` is this
    run's wall-clock budget, VAE included."""

    cli_prefix = ""

    family: str | None = option(None, "the model family: unet (StableDiffusion) or mmdit (SD3)",
                                choices=("unet", "mmdit"), shown_default="required")
    out: str | None = option(None, "output folder", shown_default="./shapes-<family>-run")
    minutes: float = option(80.0, "wall-clock budget of this run, VAE included; a checkpoint is written when it "
                            "runs out", low=0.01, high=10**6)
    steps: int = option(6000, "denoiser steps in all, over every resumed run; the learning-rate schedule follows them",
                        low=1, high=10**7)
    stop_at: int | None = option(None, "end this run at this step (checkpointed; --resume continues with the same "
                                 "schedule)", parse=int, low=1, high=10**7, shown_default="--steps")
    resume: bool = option(False, "continue from OUT/state.pt (weights, EMA, optimiser, step) if it exists")
    init: str | None = option(None, "start from a pipeline folder or builtin:NAME (its VAE, and every tensor whose "
                              "shape matches)", shown_default="random weights")
    vae_minutes: float | None = option(None, "minutes of VAE training", parse=float, low=0.01, high=10**6,
                                       shown_default="12% of --minutes")
    vae: str | None = option(None, "reuse a trained VAE (its folder, a pipeline folder or builtin:NAME) instead of "
                             "training one", shown_default="trained")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch CPU threads", parse=int, low=1, high=1024, shown_default="torch's")
    vae_threads: int | None = option(None, "torch CPU threads while the VAE trains", parse=int, low=1, high=1024,
                                     shown_default="--threads")
    batch: int = option(64, "scenes per step", low=1, high=4096)
    lr: float | None = option(None, "peak learning rate", parse=float, low=1e-9, high=1.0,
                              shown_default="the family's")
    scenes: int = option(24_000, "training scenes encoded once", low=1, high=10**7)
    checkpoint_minutes: float = option(10.0, "minutes between checkpoints", low=0.01, high=10**6)
    seed: int = option(0, "seed of the scenes and the initial weights", low=0, high=2**32 - 1)

    def __post_init__(self):
        from ..devices import checked_device

        check(self)
        if self.family is None:
            raise UsageError("--family is required: unet or mmdit")
        if self.stop_at is not None and self.stop_at > self.steps:
            raise UsageError(f"--stop-at {self.stop_at} is past --steps {self.steps}, where the training ends (this "
                             f"run would stop at {self.steps}, not {self.stop_at}); give --stop-at at most "
                             f"{self.steps}, or raise --steps")
        checked_device(self.device, "--device")
        if self.vae_minutes is not None and self.vae_minutes >= self.minutes:
            raise UsageError(f"--vae-minutes {self.vae_minutes:g} leaves nothing of --minutes {self.minutes:g} for the "
                             "denoiser; give the VAE less or the run more")


def check_arguments(args: TrainConfig) -> tuple[str | None, str | None]:
    """What `run_training` checks before it writes or trains anything: the --init and --vae folders, OUT/state.pt
    under --resume, and options that cannot act in this run. Returns the --init folder and the folder of the VAE
    to use (None: the VAE is trained, or taken from OUT/vae under --resume)."""
    out = args.out or f"shapes-{args.family}-run"
    init = _init_folder(args.init, args.family) if args.init else None
    if args.vae:
        vae = _vae_folder(_folder(args.vae, "--vae"), "--vae", args.vae)
    elif init:
        vae = _vae_folder(init, "--init", args.init)
    else:
        vae = None
    state_path = os.path.join(out, "state.pt")
    if args.resume and os.path.exists(state_path):
        step = read_state(state_path, args.family)["step"]
        if args.stop_at is not None and args.stop_at <= step:
            raise UsageError(f"--stop-at {args.stop_at}: {state_path} is already at step {step}; give a --stop-at "
                             f"after {step}")
    trained_vae = vae is None and not (args.resume and os.path.isdir(os.path.join(out, "vae")))
    for flag, value in (("--vae-minutes", args.vae_minutes), ("--vae-threads", args.vae_threads)):
        if value is not None and not trained_vae:
            source = f"--vae {args.vae}" if args.vae else f"--init {args.init}" if args.init else \
                f"{os.path.join(out, 'vae')} (--resume)"
            raise UsageError(f"{flag} applies while a VAE is trained, and this run trains none (its VAE comes from "
                             f"{source}); drop {flag}")
    return init, vae


def run_training(args: TrainConfig) -> str:
    """Train as `attnctl shapes train` says (after `check_arguments`); returns the pipeline folder written."""
    init, vae_folder = check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: a tiny model's training needs no more
    out = args.out or f"shapes-{args.family}-run"
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    if vae_folder:
        vae = _load_vae(vae_folder)
    elif args.resume and os.path.isdir(os.path.join(out, "vae")):
        vae = _load_vae(os.path.join(out, "vae"))
    else:
        vae_minutes = args.vae_minutes if args.vae_minutes is not None else 0.12 * args.minutes
        if args.vae_threads:
            torch.set_num_threads(args.vae_threads)
        vae = train_vae(os.path.join(out, "vae"), vae_minutes, args.device, args.seed)
        if args.threads:
            torch.set_num_threads(args.threads)
    remaining = args.minutes - (time.time() - t0) / 60.0
    reserve = min(1.0, 0.1 * args.minutes)  # for writing the pipeline: the budget holds however small it is
    folder = train_denoiser(args.family, vae, out, max(0.0, remaining - reserve), args.device, args.seed,
                            batch=args.batch, lr=args.lr, n_scenes=args.scenes, total_steps=args.steps,
                            checkpoint_minutes=args.checkpoint_minutes, init=init, resume=args.resume,
                            stop_at=args.stop_at)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {folder}")
    return folder
