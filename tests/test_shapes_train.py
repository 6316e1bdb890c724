"""The shapes trainer in pieces: a run that stops and resumes equals one run, bit for bit; --init takes every tensor
whose shape matches; the checkpoint is a loadable pipeline."""

import torch
from safetensors.torch import load_file

from attnctl.models import BUILTIN_DIR


def train(cli, out, steps, *extra):
    code, _, err = cli("shapes", "train", "--family", "unet", "--out", out, "--vae", "builtin:shapes-unet",
                       "--steps", steps, "--scenes", 16, "--batch", 4, "--minutes", 5, *extra)
    assert code == 0, err
    return torch.load(out / "state.pt", weights_only=False)


def test_resumed_training_equals_one_run(tmp_path, cli):
    whole = train(cli, tmp_path / "whole", 4)
    train(cli, tmp_path / "pieces", 4, "--stop-at", 2)
    assert torch.load(tmp_path / "pieces" / "state.pt", weights_only=False)["step"] == 2
    pieces = train(cli, tmp_path / "pieces", 4, "--resume")
    assert whole["step"] == pieces["step"] == 4
    assert whole["losses"] == pieces["losses"]
    for part in ("unet", "text_encoder"):
        for name, tensor in whole["parts"][part].items():
            assert torch.equal(tensor, pieces["parts"][part][name]), name
        for name, tensor in whole["ema"][part].items():
            assert torch.equal(tensor, pieces["ema"][part][name]), name
    # the checkpoint is an ordinary pipeline folder with the EMA weights in fp16
    saved = load_file(str(tmp_path / "pieces" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    name = "conv_in.weight"
    assert saved[name].dtype == torch.float16
    assert torch.equal(saved[name], pieces["ema"]["unet"][name].half())


def test_init_takes_the_matching_tensors(tmp_path, cli):
    import attnctl.shapes.train as trainer
    from attnctl.shapes import models

    shipped = load_file(str(BUILTIN_DIR / "shapes-mmdit" / "transformer" / "diffusion_pytorch_model.safetensors"))
    objective = trainer.FlowMMDiT("cpu")  # the shipped architecture: every tensor is taken
    trainer.init_from(objective.parts, str(BUILTIN_DIR / "shapes-mmdit"))
    own = objective.parts["transformer"].state_dict()
    assert set(own) == set(shipped)
    for k in own:
        assert torch.equal(own[k], shipped[k].float()), k
    patch2 = {"transformer": models.build_transformer(patch_size=2)}  # 8x8 tokens: the patch layers differ
    fresh = {k: v.clone() for k, v in patch2["transformer"].state_dict().items()}
    trainer.init_from(patch2, str(BUILTIN_DIR / "shapes-mmdit"))
    own = patch2["transformer"].state_dict()
    taken = [k for k in own if own[k].shape == shipped[k].shape]
    assert len(taken) == len(own) - 3  # the patch embedding and the output projection stay fresh
    for k in own:
        assert torch.equal(own[k], shipped[k].float() if k in taken else fresh[k]), k


def test_a_small_budget_is_kept(tmp_path, cli):
    """--minutes bounds the training however small it is (a fixed minute of reserve made 0.05 minutes train 0.5)."""
    state = train(cli, tmp_path / "run", 10**6, "--minutes", 0.05)
    assert 0 < state["step"] < 10**6 and state["minutes"] <= 0.05, (state["step"], state["minutes"])
