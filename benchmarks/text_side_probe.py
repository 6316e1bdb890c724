"""Does the text side carry the wrong binding? (issue 29, step 3.) Held-out pairs drawn from text embeddings edited
before the denoiser sees them, every arm on the same noise as the plain one:

    python benchmarks/text_side_probe.py [--model mmdit|unet] [--prompts 16] [--seeds 8] [--out out/text-side]

Arms (the CLIP part of the text; SD3's T5 part, absent from the built-in MMDiT, is left alone):
- plain: the pipeline's own embeddings;
- phrases: each object's phrase ("a red circle") encoded alone and its tokens spliced into their positions in the
  prompt, so no phrase's tokens see the other phrase through the encoder's causal attention;
- end-tokens: the end-of-text and padding positions taken from the prompt without its modifiers ("a circle and a
  square"), aligned at the end-of-text token (ToMe's end-token substitution, arXiv 2411.07132);
- phrases+end-tokens: both;
- pooled (MMDiT only): the pooled text vector of the prompt without its modifiers;
- end-tokens+pooled (MMDiT only).
Each arm's rows go to OUT/MODEL/ARM.csv when it finishes (an arm with a file is not run again); the table (both
bound, present, fixed/broken against plain, exact McNemar p) to OUT/MODEL/results.md."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from probe_rows import arm_rows, fixed_broken

from attnctl.eval import build_suite, mcnemar, sample_seed, score_case
from attnctl.models import load_pipeline, sampling_defaults

MODELS = {"mmdit": "builtin:shapes-mmdit", "unet": "builtin:shapes-unet"}
ARMS = {"unet": ("plain", "phrases", "end-tokens", "phrases+end-tokens"),
        "mmdit": ("plain", "phrases", "end-tokens", "phrases+end-tokens", "pooled", "end-tokens+pooled")}


def encode(pipe, text: str) -> dict:
    """The pipeline's own conditional and unconditional embeddings of `text` (and pooled vectors where it has them)."""
    if hasattr(pipe, "text_encoder_3"):
        pe, npe, pp, npp = pipe.encode_prompt(prompt=text, prompt_2=text, prompt_3=text, device="cpu",
                                              num_images_per_prompt=1, do_classifier_free_guidance=True)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": pp,
                "negative_pooled_prompt_embeds": npp}
    pe, npe = pipe.encode_prompt(text, "cpu", 1, True)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


def find(ids: list[int], part: list[int]) -> int:
    """Where the token sequence `part` starts in `ids`."""
    for i in range(len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    raise ValueError(f"{part} not in {ids}")


def edited(pipe, case, arm: str) -> dict:
    """The embeddings of one arm for `case`."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(case.prompt).input_ids
    out = encode(pipe, case.prompt)
    pe = out["prompt_embeds"].clone()
    if "phrases" in arm:
        for phrase in case.phrases:
            inner = tokenizer(phrase).input_ids[1:-1]  # without the start and end tokens
            at = find(ids, inner)
            pe[:, at:at + len(inner)] = encode(pipe, phrase)["prompt_embeds"][:, 1:1 + len(inner)]
    bare = " and ".join(f"a {shape}" for _, shape in case.objects)
    if "end-tokens" in arm:
        end, bare_end = len(ids) - 1, len(tokenizer(bare).input_ids) - 1
        length = tokenizer.model_max_length
        pe[:, end:length] = encode(pipe, bare)["prompt_embeds"][:, bare_end:bare_end + length - end]
    out["prompt_embeds"] = pe
    if "pooled" in arm:
        out["pooled_prompt_embeds"] = encode(pipe, bare)["pooled_prompt_embeds"]
    return out


def run_arm(pipe, arm: str, cases, seeds, sampling) -> list[dict]:
    rows = []
    for n, case in enumerate(cases):
        embeds = {k: v.repeat(len(seeds), *[1] * (v.dim() - 1)) for k, v in edited(pipe, case, arm).items()}
        images = pipe(**embeds,
                      generator=[torch.Generator().manual_seed(sample_seed(case, s)) for s in seeds],
                      num_inference_steps=sampling.get("num_inference_steps", 25),
                      guidance_scale=sampling.get("guidance_scale", 5.0)).images
        for seed, image in zip(seeds, images):
            s = score_case(case, image)
            rows.append({"arm": arm, "prompt": case.prompt, "seed": seed, "present": int(s["present"]),
                         "bound": int(s["bound"])})
        print(f"{arm} {n + 1}/{len(cases)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="mmdit")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("out/text-side"))
    args = parser.parse_args()
    model, out = MODELS[args.model], args.out / args.model
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cases = [c for c in build_suite(args.prompts) if "two_objects" in c.categories]
    seeds = list(range(args.seeds))
    results = {}
    for arm in ARMS[args.model]:
        results[arm] = arm_rows(out / f"{arm}.csv",
                                lambda arm=arm: run_arm(pipe, arm, cases, seeds, sampling_defaults(model)))
    plain = results["plain"]
    lines = [f"# Text-side probe on {model} (held-out pairs: {len(cases)} prompts x {len(seeds)} seeds)", "",
             "| arm | both bound | both present | fixed | broken | exact McNemar p |", "|---|---|---|---|---|---|"]
    for arm, rows in results.items():
        bound = sum(int(r["bound"]) for r in rows.values())
        present = sum(int(r["present"]) for r in rows.values())
        fixed, broken = fixed_broken(rows, plain, "bound")
        p = "" if arm == "plain" else f"{mcnemar(fixed, broken):.3g}"
        lines.append(f"| {arm} | {bound}/{len(rows)} | {present}/{len(rows)} | {fixed if p else ''} | "
                     f"{broken if p else ''} | {p} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
