"""Shapes-world models: the small CLIP vocabulary, pipeline formats, the shipped folders."""

from pathlib import Path

import pytest
import torch

from attnctl.shapes import data, models


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tokenizer()


def test_every_shapes_word_is_one_token(tokenizer):
    vocab = tokenizer.get_vocab()
    for word in data.VOCABULARY:
        ids = tokenizer(word).input_ids
        assert ids == [vocab[models.BOS], vocab[word + "</w>"], vocab[models.EOS]], word


def test_caption_tokens_and_padding(tokenizer):
    cap = "a purple triangle to the right of a yellow square"
    enc = tokenizer(cap, padding="max_length", max_length=tokenizer.model_max_length)
    toks = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert toks[: 2 + len(cap.split())] == [models.BOS] + [w + "</w>" for w in cap.split()] + [models.EOS]
    assert len(enc.input_ids) == models.TEXT_MAX_LENGTH
    assert set(toks[len(cap.split()) + 1:]) == {models.EOS}  # padded with end-of-text
    # longest caption the generator writes fits
    longest = max((data.sample_scene(s, n_objects=2).caption for s in range(300)), key=lambda c: len(c.split()))
    assert len(tokenizer(longest).input_ids) <= models.TEXT_MAX_LENGTH


def test_other_words_fall_back_to_characters(tokenizer):
    toks = tokenizer.convert_ids_to_tokens(tokenizer("a reddish Hexagon!").input_ids)
    assert toks[1] == "a</w>"
    assert "reddish</w>" not in toks and "hexagon</w>" not in toks
    assert models.EOS == toks[-1] and toks.count(models.EOS) == 1
    assert len(tokenizer.get_vocab()) < 700


def test_tokenizer_files_load(tmp_path, tokenizer):
    from transformers import CLIPTokenizer

    models.write_tokenizer_files(str(tmp_path))
    loaded = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    cap = "a green circle above a blue triangle"
    assert loaded(cap).input_ids == tokenizer(cap).input_ids


def test_repeated_token_processor_is_exact():
    """Training attends to one zero T5 token with logit + log 256; the pipeline uses 256 of them."""
    from attnctl.shapes.train import RepeatedLastTokenJointProcessor, sd3_text, tokenize

    torch.manual_seed(0)
    tr = models.build_transformer(num_layers=2).eval()
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    te1, te2 = models.build_text_encoder(True), models.build_text_encoder(True)
    ids = tokenize(models.build_tokenizer(), ["a red circle", "a blue square above a red triangle"])
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 900.0])
    with torch.no_grad():
        full, pooled = sd3_text(te1, te2, ids, models.SD3_T5_LENGTH)
        ref = tr(z, full, pooled, t).sample
        short, _ = sd3_text(te1, te2, ids, 1)
        tr.set_attn_processor(RepeatedLastTokenJointProcessor(models.SD3_T5_LENGTH))
        fast = tr(z, short, pooled, t).sample
    assert torch.allclose(ref, fast, atol=1e-5)
    pipe = models.assemble_mmdit_pipeline(models.build_vae(), te1, te2, tr)
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(["a red circle"], None, None, do_classifier_free_guidance=False)
    assert pe.shape == (1, models.TEXT_MAX_LENGTH + models.SD3_T5_LENGTH, 128)
    assert torch.allclose(pe, full[:1]) and torch.allclose(pp, pooled[:1], atol=1e-6)


def test_random_unet_pipeline_round_trip(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = models.assemble_unet_pipeline(models.build_vae(), models.build_text_encoder(), models.build_unet())
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.vae_scale_factor == models.VAE_FACTOR
    img = loaded("a red circle", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, data.IMAGE_SIZE, data.IMAGE_SIZE, 3)


def test_unet_sampler_avoids_the_degenerate_last_timestep():
    sched = models.build_unet_scheduler()
    for steps in (25, 50):
        sched.set_timesteps(steps)
        assert len(sched.timesteps) == steps
        assert int(sched.timesteps[0]) <= 961  # alpha_bar(999) of the cosine schedule is ~2e-9
        assert float(sched.alphas_cumprod[int(sched.timesteps[0])]) > 1e-4


BUILTIN = Path(models.__file__).resolve().parent.parent / "builtin"


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


@pytest.mark.skipif(not (BUILTIN / "shapes-unet").is_dir(), reason="shapes-unet not shipped in this checkout")
def test_builtin_unet_runs():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN / "shapes-unet")
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in dict(pipe.unet.named_modules())
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, data.IMAGE_SIZE, data.IMAGE_SIZE, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.skipif(not (BUILTIN / "shapes-mmdit").is_dir(), reason="shapes-mmdit not shipped in this checkout")
def test_builtin_mmdit_runs():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(BUILTIN / "shapes-mmdit", text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    out = pipe("a blue square", num_inference_steps=2, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, data.IMAGE_SIZE, data.IMAGE_SIZE, 3)


@pytest.mark.skipif(not BUILTIN.is_dir(), reason="no built-in models in this checkout")
def test_builtin_size_budget():
    folders = [BUILTIN / n for n in ("shapes-unet", "shapes-mmdit") if (BUILTIN / n).is_dir()]
    assert sum(_folder_mb(f) for f in folders) <= 25.0


@pytest.mark.skipif(not BUILTIN.is_dir(), reason="no built-in models in this checkout")
def test_builtin_tokenizer_files_agree(tokenizer):
    from transformers import CLIPTokenizer

    for folder in sorted(BUILTIN.glob("shapes-*/tokenizer*")):
        saved = CLIPTokenizer.from_pretrained(folder)
        files = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
        cap = "a yellow triangle below a purple circle"
        assert saved(cap).input_ids == files(cap).input_ids == tokenizer(cap).input_ids
        assert saved.model_max_length == models.TEXT_MAX_LENGTH
