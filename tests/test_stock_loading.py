"""The shipped stock-pipeline models load with plain diffusers, and the policy with its documented call."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, WanPipeline

from diffusers_block.pipelines.policy import DiffusionPolicyPipeline
from diffusers_block.zoo import (
    LabelEncoder,
    NoTextEncoder,
    load_digits_image_pipeline,
    load_digits_video_pipeline,
    model_path,
)
from diffusers_block.zoo.no_text_encoder import TEXT_SLOTS, expected_placeholders


def _first_image(pipe, encoder, seed=0):
    generator = torch.Generator().manual_seed(seed)
    kwargs = encoder.prompt_kwargs([3])
    return pipe(**kwargs, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="pt").images


def test_digits_image_loads_with_plain_from_pretrained():
    folder = model_path("digits-image")
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusion3Pipeline
    assert all(isinstance(getattr(pipe, slot), NoTextEncoder) for slot in TEXT_SLOTS["StableDiffusion3Pipeline"])
    pipe.set_progress_bar_config(disable=True)
    encoder = LabelEncoder.from_pretrained(folder / "label_encoder")
    zoo_pipe, zoo_encoder = load_digits_image_pipeline()
    zoo_pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_first_image(pipe, encoder), _first_image(zoo_pipe, zoo_encoder), rtol=0, atol=0)


def test_a_prompt_string_says_how_to_condition_the_model():
    pipe = DiffusionPipeline.from_pretrained(model_path("digits-image"))
    with pytest.raises(TypeError, match="conditioned on labels, not text.*label_encoder"):
        pipe("three", num_inference_steps=1)


def test_digits_video_loads_with_plain_from_pretrained():
    pipe = DiffusionPipeline.from_pretrained(model_path("digits-video"))
    assert type(pipe) is WanPipeline
    assert isinstance(pipe.text_encoder, NoTextEncoder) and isinstance(pipe.tokenizer, NoTextEncoder)
    assert pipe.to(torch.bfloat16).dtype == torch.bfloat16  # the placeholders follow the pipeline's moves


def test_a_folder_saved_with_empty_text_slots_still_loads_in_the_zoo(tmp_path):
    folder = shutil.copytree(model_path("digits-video"), tmp_path / "old", ignore=shutil.ignore_patterns("training"))
    index = json.loads((folder / "model_index.json").read_text())
    for slot in TEXT_SLOTS["WanPipeline"]:
        index[slot] = [None, None]
        shutil.rmtree(folder / slot)
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe, _ = load_digits_video_pipeline(folder)
    assert pipe.text_encoder is None and pipe.tokenizer is None


def test_the_zoo_loads_quietly_and_plain_loading_says_what_the_slots_hold(caplog):
    import diffusers.utils.logging as diffusers_logging

    diffusers_logging.enable_propagation()  # so that caplog sees diffusers' records
    try:
        with caplog.at_level("WARNING"):
            with expected_placeholders():
                DiffusionPipeline.from_pretrained(model_path("digits-video"))
            assert "NoTextEncoder" not in caplog.text
            DiffusionPipeline.from_pretrained(model_path("digits-video"))
            assert "Expected types for text_encoder" in caplog.text and "NoTextEncoder" in caplog.text
    finally:
        diffusers_logging.disable_propagation()


def test_the_policy_loads_with_its_documented_call(monkeypatch):
    monkeypatch.chdir(model_path("policy-metaworld").parents[1])  # README: from the repository root
    pipe = DiffusionPolicyPipeline.from_pretrained("models/policy-metaworld")
    assert pipe.task_names and isinstance(pipe, DiffusionPolicyPipeline)


def test_the_any_pipeline_tab_treats_placeholders_as_missing_text_encoders():
    pytest.importorskip("gradio")
    from diffusers_block.demo.pipeline import PipelineLoadError, load_pipeline

    with pytest.raises(PipelineLoadError, match="saved without its text encoders"):
        load_pipeline(str(model_path("digits-image")), "cpu", torch.float32)
