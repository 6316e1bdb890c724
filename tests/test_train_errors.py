"""`attnctl shapes train` refuses, with exit status 2 and a message naming the file or flag and the fix, what would
otherwise fail deep inside torch after minutes of work or be quietly ignored: an unreadable or foreign OUT/state.pt
under --resume, --init / --vae folders without the model they should hold, an --init of the other family, a --stop-at
past --steps or already reached, VAE options when no VAE is trained. All checked before any training starts."""

import torch

from attnctl.models import BUILTIN_DIR
from attnctl.shapes.train import STATE_KEYS, read_state

# a run that would take seconds if a check failed to stop it (the shipped VAE, few scenes and steps)
QUICK = ["--scenes", 4, "--batch", 2, "--steps", 2, "--minutes", 0.05]


def train(cli, out, *extra, family="unet"):
    code, out_text, err = cli("shapes", "train", "--family", family, "--out", out, *QUICK, *extra)
    assert "Traceback" not in err
    return code, err


def state(family="unet", step=1, **changes):
    parts = {"unet": ["unet", "text_encoder"], "mmdit": ["transformer", "text_encoder", "text_encoder_2"]}[family]
    value = {"parts": dict.fromkeys(parts, {}), "ema": dict.fromkeys(parts, {}), "optimizer": {}, "step": step,
             "losses": [], "minutes": 0.0, "generator": torch.Generator().get_state()}
    return {**value, **changes}


def test_stop_at_past_steps(cli, tmp_path):
    code, err = train(cli, tmp_path, "--stop-at", 3)
    assert code == 2
    assert ("--stop-at 3 is past --steps 2, where the training ends (this run would stop at 2, not 3); give --stop-at "
            "at most 2, or raise --steps") in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_corrupt_state_is_refused_with_its_path(cli, tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"PK\x03\x04 not a zip archive")
    code, err = train(cli, tmp_path, "--resume", "--vae", "builtin:shapes-unet")
    assert code == 2
    assert f"--resume: {path} is not a training state that attnctl wrote (corrupt or truncated? " in err
    assert err.rstrip().endswith("; delete it to start afresh, or drop --resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # nothing trained or cached


def test_an_unreadable_state_is_refused(cli, tmp_path):
    (tmp_path / "state.pt").mkdir()  # a folder where the file should be: open() fails, also for root
    code, err = train(cli, tmp_path, "--resume")
    assert code == 2
    assert f"--resume: {tmp_path / 'state.pt'} cannot be read (Is a directory); delete it to start afresh, or drop " \
           "--resume" in err


def test_a_state_of_something_else_or_the_other_family_is_refused(cli, tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"step": 3}, path)
    code, err = train(cli, tmp_path, "--resume")
    assert code == 2
    assert (f"--resume: {path} is not a training state that attnctl wrote (it needs {', '.join(STATE_KEYS)}); delete "
            "it to start afresh, or drop --resume") in err
    torch.save(state("mmdit"), path)
    code, err = train(cli, tmp_path, "--resume")
    assert code == 2
    assert (f"--resume: {path} is the state of a --family mmdit training, and this is --family unet; give --family "
            "mmdit, or another --out for the unet training") in err
    assert read_state(str(path), "mmdit")["step"] == 1  # the right family reads it


def test_a_state_whose_tensors_do_not_fit_is_refused(cli, tmp_path):
    torch.save(state(parts={"unet": {"conv_in.weight": torch.zeros(1)}, "text_encoder": {}}), tmp_path / "state.pt")
    code, err = train(cli, tmp_path, "--resume", "--vae", "builtin:shapes-unet")
    assert code == 2
    assert f"{tmp_path / 'state.pt'} does not fit the unet models this version trains (" in err
    assert err.rstrip().endswith("; delete it to start afresh, or drop --resume")


def test_stop_at_already_reached_is_refused(cli, tmp_path):
    torch.save(state(step=2), tmp_path / "state.pt")
    code, err = train(cli, tmp_path, "--resume", "--stop-at", 2, "--vae", "builtin:shapes-unet")
    assert code == 2
    assert f"--stop-at 2: {tmp_path / 'state.pt'} is already at step 2; give a --stop-at after 2" in err


def test_init_must_name_a_pipeline_of_the_family(cli, tmp_path):
    missing = tmp_path / "nowhere"
    code, err = train(cli, tmp_path / "out", "--init", missing)
    assert code == 2
    assert (f"--init '{missing}' does not exist; give a pipeline folder (such as OUT/pipeline of an earlier training) "
            "or builtin:shapes-unet / builtin:shapes-mmdit") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = train(cli, tmp_path / "out", "--init", empty)
    assert code == 2
    assert (f"--init '{empty}' holds no unet weights (unet/*.safetensors); give a --family unet pipeline folder (such "
            "as OUT/pipeline of an earlier training, with vae/ and unet/) or builtin:shapes-unet") in err
    code, err = train(cli, tmp_path / "out", "--init", "builtin:shapes-mmdit")
    assert code == 2
    assert ("--init 'builtin:shapes-mmdit' is a --family mmdit pipeline (it has transformer/, no unet/), and this is "
            "--family unet: none of its denoiser's tensors would fit; give --family mmdit, or an --init of the unet "
            "family") in err
    code, err = train(cli, tmp_path / "out", "--init", "builtin:shapes-unet", family="mmdit")
    assert code == 2
    assert "--init 'builtin:shapes-unet' is a --family unet pipeline (it has unet/, no transformer/)" in err
    assert not (tmp_path / "out").exists()


def test_vae_must_name_a_vae(cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    unet = BUILTIN_DIR / "shapes-unet" / "unet"  # config.json and weights, of a UNet
    for folder in (empty, unet):
        code, err = train(cli, tmp_path / "out", "--vae", folder)
        assert code == 2
        assert (f"--vae '{folder}' holds no VAE: give a VAE folder (config.json of an AutoencoderKL and "
                "diffusion_pytorch_model.safetensors), a pipeline folder with such a vae/ folder, or "
                "builtin:shapes-unet / builtin:shapes-mmdit") in err
    code, err = train(cli, tmp_path / "out", "--vae", tmp_path / "nowhere")
    assert code == 2 and f"--vae '{tmp_path / 'nowhere'}' does not exist" in err
    # an --init without a VAE is refused too: the VAE comes from it
    init = tmp_path / "init"
    (init / "unet").mkdir(parents=True)
    (init / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(
        (BUILTIN_DIR / "shapes-unet" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    code, err = train(cli, tmp_path / "out", "--init", init)
    assert code == 2 and f"--init '{init}' holds no VAE" in err
    assert not (tmp_path / "out").exists()


def test_vae_options_without_a_vae_to_train_are_refused(cli, tmp_path):
    code, err = train(cli, tmp_path, "--vae", "builtin:shapes-unet", "--vae-minutes", 0.01)
    assert code == 2
    assert ("--vae-minutes applies while a VAE is trained, and this run trains none (its VAE comes from --vae "
            "builtin:shapes-unet); drop --vae-minutes") in err
    (tmp_path / "vae").mkdir()
    code, err = train(cli, tmp_path, "--resume", "--vae-threads", 1)
    assert code == 2
    assert f"this run trains none (its VAE comes from {tmp_path / 'vae'} (--resume)); drop --vae-threads" in err


def test_a_vae_budget_that_leaves_the_denoiser_nothing_is_refused(tmp_path, cli):
    code, err = train(cli, tmp_path, "--vae-minutes", 1)
    assert code == 2 and "--vae-minutes 1 leaves nothing of --minutes 0.05 for the denoiser" in err, err
