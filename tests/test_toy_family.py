"""A new family is its module plus one entry in `FAMILIES` (docs/adding-a-family.md): the toy of tests/toy_family.py,
registered so, is read like every other family — sites, tokens, maps and a method — without attnctl knowing it
otherwise; unregistered, it is refused by name."""

import pytest
import torch

import attnctl
from attnctl import families
from attnctl.errors import UsageError
from toy_family import ToyFamily, ToyPipeline

PROMPT = "a red cat"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", [*families.FAMILIES, ToyFamily()])  # the registry line
    return ToyPipeline()


def _run(pipe, controllers=(), prompt=PROMPT):
    with attnctl.apply(pipe, *controllers, prompt=prompt):
        return pipe(prompt, generator=torch.Generator().manual_seed(0)).images


def test_an_unregistered_family_is_refused_naming_the_denoiser():
    with pytest.raises(UsageError, match="does not know the denoiser ToyDenoiser; supported: UNet2DConditionModel"):
        attnctl.sites_of(ToyPipeline())


def test_a_registered_family_gives_sites_tokens_and_maps_and_changes_nothing_by_observing(toy):
    (site,) = attnctl.sites_of(toy)
    assert (site.name, site.family, site.kind) == ("attn", "toy", "cross")
    tokens = attnctl.prompt_tokens(toy, PROMPT)[0]
    assert tokens.word_positions("cat") == [3]  # <start> a red cat
    plain = toy(PROMPT, generator=torch.Generator().manual_seed(0)).images
    capture = attnctl.Capture(["cat"])
    assert torch.equal(_run(toy, [capture]), plain)  # observing reproduces the model's own attention exactly
    (maps,) = capture.maps().values()
    assert maps.shape == (1, 1, 8, 8) and torch.isfinite(maps).all()  # (images, words, grid rows, grid columns)
    assert {type(m.processor).__name__ for m in toy.transformer.modules() if hasattr(m, "processor")} == {
        "AttnProcessor2_0"}  # restored


def test_a_method_acts_through_the_registered_family(toy):
    plain = _run(toy)
    regulated = _run(toy, [attnctl.Regulation(["cat"], iterations=3)])
    assert not torch.equal(regulated, plain)
