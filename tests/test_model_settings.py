"""A model folder's attnctl.json (its recommended sampling settings and method options): every malformed file is a
clear UsageError naming the file and the setting, and a valid one is used as written (issue 33)."""

import json

import pytest

from attnctl.errors import UsageError
from attnctl.models import recommended_options, sampling_defaults

BAD = [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"num_inference_steps": 100000}).encode(), "num_inference_steps: --steps must be between 1 and 1000"),
    (json.dumps({"num_inference_steps": 2.5}).encode(), "num_inference_steps: --steps must be a whole number"),
    (json.dumps({"num_inference_steps": True}).encode(), "num_inference_steps: --steps must be a number"),
    (b'{"guidance_scale": NaN}', "guidance_scale: --guidance must be a finite number"),
    (json.dumps({"height": 4}).encode(), "height: --height must be between 8 and 4096"),
    (json.dumps({"num_inference_step": 20}).encode(), "unknown setting 'num_inference_step'"),
    (json.dumps({"methods": "regulation"}).encode(), '"methods" must map method names to their options'),
    (json.dumps({"methods": {"regulaton": {}}}).encode(), "unknown method 'regulaton'"),
    (json.dumps({"methods": {"regulation": [1]}}).encode(), "the options of 'regulation' must be a JSON object"),
    (json.dumps({"methods": {"regulation": {"strenght": 1}}}).encode(), "unknown RegulationConfig option(s) strenght"),
    (json.dumps({"methods": {"ast": {"strength": -1}}}).encode(), "ast: strength"),
]


@pytest.mark.parametrize("content, message", BAD)
def test_a_malformed_settings_file_is_refused_naming_the_problem(content, message, tmp_path):
    (tmp_path / "attnctl.json").write_bytes(content)
    for read in (sampling_defaults, lambda spec: recommended_options(spec, "regulation")):
        with pytest.raises(UsageError, match="attnctl.json") as caught:
            read(str(tmp_path))
        assert message in str(caught.value)


def test_valid_settings_are_used_as_written_and_attend_and_excite_thresholds_can_be_recommended(tmp_path):
    from attnctl.config import build
    from attnctl.methods.attend_excite import AttendExciteConfig

    (tmp_path / "attnctl.json").write_text(json.dumps({
        "num_inference_steps": 20, "guidance_scale": 4.5,
        "methods": {"attend-excite": {"thresholds": {"0": 0.1, "5": 0.6}}}}))
    assert sampling_defaults(str(tmp_path)) == {"num_inference_steps": 20, "guidance_scale": 4.5}
    options = recommended_options(str(tmp_path), "attend-excite")
    assert build(AttendExciteConfig, None, **options).thresholds == {0: 0.1, 5: 0.6}
    assert recommended_options(str(tmp_path / "nowhere"), "regulation") == {}


def test_the_command_line_refuses_the_folder_before_loading_it(tmp_path, cli):
    (tmp_path / "attnctl.json").write_text('{"methods": {"regulation": {"strength": "high"}}}')
    code, out, err = cli("generate", "--model", tmp_path, "--prompt", "a cat", "--out", tmp_path / "out")
    assert code == 2 and "attnctl.json" in err and "strength" in err, err
    assert "Traceback" not in out + err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"\xff", "is not UTF-8 text"),
    (b"[]", "must be a JSON object"),
    (b'{"unet": ["diffusers", "UNet2DConditionModel"]}', 'has no "_class_name"'),
    (b'{"_class_name": "NoSuchPipeline"}', "'NoSuchPipeline', which is not a diffusers pipeline class"),
    (b'{"_class_name": "UNet2DConditionModel"}', "which is not a diffusers pipeline class"),
    (b'{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}',
     "could not load the pipeline folder"),
])
def test_a_malformed_pipeline_folder_is_refused_naming_the_problem(content, message, tmp_path, cli):
    (tmp_path / "model_index.json").write_bytes(content)
    code, out, err = cli("sites", "--model", tmp_path)
    assert code == 2 and message in err, err
    assert "Traceback" not in out + err


def test_a_models_recommendations_are_logged_once_not_per_request(caplog):
    """An evaluation builds one request per case: the recommendations in use are said once, not once per case."""
    import logging

    from attnctl.layout import Layout
    from attnctl.run import Request, _say_recommended

    layout = Layout.from_prompt("a red circle to the left of a blue square")
    _say_recommended.cache_clear()  # an earlier test in this process may have said it
    with caplog.at_level(logging.INFO, logger="attnctl.run"):
        for _ in range(3):
            Request(method="relocation", layout=layout, model="builtin:shapes-mmdit").config()
    said = [r.getMessage() for r in caplog.records if "recommends" in r.getMessage()]
    assert len(said) == 1 and "locator=contrast" in said[0]
