"""What the sub-commands that write files print: every file written in --out, one path per line, at the end."""

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--steps", "1", "--height", "64", "--width", "64"]


def listed(out: str, folder: Path) -> list[str]:
    """The paths after the last 'wrote N file(s) to FOLDER:' line, which must end the output and count them."""
    lines = out.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("wrote "))
    paths = lines[header + 1:]
    assert lines[header] == f"wrote {len(paths)} file(s) to {folder}:"
    assert len(set(paths)) == len(paths)
    return paths


def present(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*") if p.is_file()}


def test_maps_lists_every_file_it_wrote(tmp_path, cli):
    code, out, err = cli("maps", "--model", "random:sd15-tiny", "--prompt", "a cat and a dog", "--words", "cat,dog",
                         *SMALL, "--out", tmp_path)
    assert code == 0, err
    assert set(listed(out, tmp_path)) == present(tmp_path) == {
        str(tmp_path / name) for name in ("image.png", "maps.png", "maps.safetensors")}


def test_generate_lists_every_file_it_wrote(tmp_path, cli):
    code, out, err = cli("generate", "--method", "regulation", "--targets", "cat,dog", "--model", "random:sd15-tiny",
                         "--prompt", "a cat and a dog", "--maps", "--num-images", "2", *SMALL, "--out", tmp_path)
    assert code == 0, err
    names = ("image_0.png", "image_1.png", "plain_0.png", "plain_1.png", "compare.png", "maps.png", "maps_1.png",
             "maps.safetensors")
    assert set(listed(out, tmp_path)) == present(tmp_path) == {str(tmp_path / name) for name in names}
    code, out, err = cli("generate", "--method", "none", "--model", "random:sd15-tiny", "--prompt", "a cat", *SMALL,
                         "--out", tmp_path / "none")
    assert code == 0, err
    none = tmp_path / "none"
    assert listed(out, none) == [str(none / "image.png")] == sorted(present(none))


def test_generate_ast_and_analyze_list_every_file_they_wrote(tmp_path, cli):
    base = ["--model", "random:flux-tiny", "--layout", EXAMPLES / "two_animals.json", *SMALL]
    code, out, err = cli("generate", "--method", "ast", "--maps", *base, "--out", tmp_path / "ast")
    assert code == 0, err
    names = ("image.png", "image_layout.png", "plain.png", "plain_layout.png", "compare.png", "maps.png",
             "maps.safetensors")
    assert set(listed(out, tmp_path / "ast")) == present(tmp_path / "ast") == {
        str(tmp_path / "ast" / name) for name in names}
    code, out, err = cli("analyze", *base, "--out", tmp_path / "analyze")
    assert code == 0, err
    names = ("hierarchy.csv", "hierarchy.png", "image.png", "image_layout.png")
    assert set(listed(out, tmp_path / "analyze")) == present(tmp_path / "analyze") == {
        str(tmp_path / "analyze" / name) for name in names}


def test_generate_with_the_peers_lists_every_file_it_wrote(tmp_path, cli):
    code, out, err = cli("generate", "--method", "attend-excite", "--targets", "dog", "--model", "random:sd15-tiny",
                         "--prompt", "a cat and a dog", "--maps", "--steps", "2", "--height", "128", "--width", "128",
                         "--out", tmp_path / "ae")
    assert code == 0, err
    names = ("image.png", "plain.png", "compare.png", "maps.png", "maps.safetensors")
    assert set(listed(out, tmp_path / "ae")) == present(tmp_path / "ae") == {
        str(tmp_path / "ae" / name) for name in names}
    code, out, err = cli("generate", "--method", "layout-modulation", "--model", "random:sd3-tiny", "--layout",
                         EXAMPLES / "two_animals.json", *SMALL, "--out", tmp_path / "lm")
    assert code == 0, err
    assert set(listed(out, tmp_path / "lm")) == present(tmp_path / "lm") == {
        str(tmp_path / "lm" / name) for name in ("image.png", "image_layout.png")}


def test_seed_grid_writes_the_plain_and_method_images_of_each_seed(tmp_path, cli):
    from PIL import Image

    base = ["generate", "--model", "random:sd15-tiny", "--prompt", "a red cat and a blue dog", *SMALL]
    code, out, err = cli(*base, "--method", "binding", "--seed", "3", "--seed-grid", "2", "--out", tmp_path)
    assert code == 0, err
    assert set(listed(out, tmp_path)) == present(tmp_path) == {
        str(tmp_path / name) for name in ("image.png", "seeds.png", "seeds.csv")}
    lines = (tmp_path / "seeds.csv").read_text().splitlines()
    assert lines == ["seed,plain,binding", "3,,", "4,,"]  # a random model: nothing the shapes scorer can judge
    assert Image.open(tmp_path / "seeds.png").size[0] > 300


def test_a_seed_of_the_grid_draws_what_that_seed_draws_alone():
    """The grid's batch (one generator per seed) must not change an image: column k is `generate --seed SEED+k`, up
    to the float rounding of a batched convolution (some CPUs sum a batch of two in another order: one 8-bit value
    in 12288 one step off was seen), while another seed is another image."""
    import numpy as np

    from attnctl.cli import build_parser
    from attnctl.cli.common import sampling_of
    from attnctl.models import load_pipeline
    from attnctl.run import pipeline_call

    pipe = load_pipeline("random:sd15-tiny")
    args = build_parser().parse_args(["generate", "--model", "random:sd15-tiny", "--prompt", "a cat", *SMALL,
                                      "--steps", "2", "--seed", "4", "--out", "unused"])
    sampling = sampling_of(args)
    alone = pipeline_call(pipe, "a cat", sampling, "random:sd15-tiny")[0]
    grid = pipeline_call(pipe, "a cat", sampling, "random:sd15-tiny", seeds=[3, 4])
    same = np.abs(np.asarray(grid[1]).astype(int) - np.asarray(alone).astype(int))
    assert same.max() <= 1 and (same > 0).mean() < 1e-3, (same.max(), (same > 0).mean())
    other = np.abs(np.asarray(grid[0]).astype(int) - np.asarray(alone).astype(int))
    assert other.mean() > 5, other.mean()
