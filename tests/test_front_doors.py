"""The front doors (issue 30): a pipeline's sites and a prompt's tokens without attaching anything, the same as what
`apply` sees, also while another session holds the pipeline."""

import attnctl

from conftest import tiny_pipe


def test_sites_and_tokens_without_attaching_are_the_sessions():
    pipe = tiny_pipe("sd3")
    before = dict(pipe.transformer.attn_processors)
    prompt = ["a red circle and a blue square", "a cat in a circle"]
    with attnctl.apply(pipe, attnctl.Capture(["circle"]), prompt=prompt) as session:
        sites, tokens = attnctl.sites_of(pipe), attnctl.prompt_tokens(pipe, prompt)  # while attached
        assert [s.name for s in sites] == [s.name for s in session.sites]
        assert [(t.prompt, t.token_strings, t.word_positions("circle")) for t in tokens] == [
            (t.prompt, t.token_strings, t.word_positions("circle")) for t in session.prompts]
    assert attnctl.prompt_tokens(pipe, "a cat in a circle")[0].token_strings == tokens[1].token_strings
    assert dict(pipe.transformer.attn_processors) == before  # nothing attached or left behind
