"""DiffusionConfig carries one SamplerConfig (the artifact's default); SamplerConfig.override is the one merge."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json

import pytest

from dheads.engine.config import DiffusionConfig, SamplerConfig

OLD = {"num_timesteps": 1000, "schedule": "cosine", "sampling_steps": 10, "sampler": "ddpm", "frame_noise": "fresh",
       "spacing": "trailing"}  # the diffusion block of the shipped demo's manifest.json, as written before


def test_older_artifacts_loose_keys_are_read_into_one_sampler_config():
    d = DiffusionConfig.from_dict(OLD)
    assert d.sampling == SamplerConfig("ddpm", 10, spacing="trailing")
    assert DiffusionConfig.from_dict({"num_timesteps": 1000, "schedule": "cosine", "sampling_steps": 25,
                                      "sampler": "ddim"}).sampling == SamplerConfig("ddim", 25)  # oldest: 2 keys
    assert (d.sampler, d.sampling_steps, d.frame_noise, d.spacing) == ("ddpm", 10, "fresh", "trailing")  # views
    with pytest.raises(ValueError, match=r"^unknown DiffusionConfig fields: \['steps'\]$"):
        DiffusionConfig.from_dict({**OLD, "steps": 3})


def test_new_form_round_trips_with_warm_start_eta_and_tables():
    s = SamplerConfig("ddim", 8, eta=0.5, tables="float64", warm_steps=3, spacing="karras", frame_noise="0.8")
    d = DiffusionConfig(num_timesteps=1000, sampling=s)
    doc = d.to_dict()
    assert doc == {"num_timesteps": 1000, "schedule": "cosine", "sampling": s.to_dict()}
    assert DiffusionConfig.from_dict(json.loads(json.dumps(doc))) == d
    from dheads.engine.plan import default_sampler

    assert default_sampler(d) == s  # warm_steps, eta and tables kept (the old rebuild dropped them)


def test_a_default_that_does_not_fit_the_models_T_is_refused():
    with pytest.raises(ValueError, match=r"^steps must be at most 50 \(the model's diffusion timesteps\), got 100$"):
        DiffusionConfig(num_timesteps=50)
    assert DiffusionConfig(num_timesteps=50, sampling_steps=50).sampling.steps == 50


def test_replace_with_the_older_keywords_still_works():
    d = DiffusionConfig.from_dict(OLD)
    assert dataclasses.replace(d, sampling_steps=4, frame_noise="0.9").sampling == SamplerConfig(
        "ddpm", 4, spacing="trailing", frame_noise="0.9")


def test_override_keeps_what_is_not_given():
    base = SamplerConfig("dpmpp_2m_sde", 10, warm_steps=2, spacing="trailing", frame_noise="repeat")
    assert base.override() is base and base.override(steps=None, name=None) is base
    assert base.override(steps=4) == dataclasses.replace(base, steps=4)
    assert base.override(name="ddim", eta=0.3, warm_steps=0) == dataclasses.replace(base, name="ddim", eta=0.3,
                                                                                  warm_steps=0)
    with pytest.raises(ValueError, match=r"^unknown sampler setting 'stepz'; known: "):
        base.override(stepz=3)
    with pytest.raises(ValueError, match=r"^warm steps must be in 0\.\.steps \(1\), got 2$"):
        base.override(steps=1)
    with pytest.raises(ValueError, match=r"^tables = authors reproduces"):
        base.override(tables="authors")


def test_override_keeps_the_rest_and_the_plan_checks_the_models_T():
    from dheads.engine.plan import make_plan

    d = DiffusionConfig(num_timesteps=500, sampling=SamplerConfig("ddim", 5, warm_steps=2))
    assert d.sampling.override(steps=7) == SamplerConfig("ddim", 7, warm_steps=2)
    with pytest.raises(ValueError, match=r"^steps must be at most 500 \(the model's diffusion timesteps\), got 501$"):
        make_plan(d, d.sampling.override(steps=501))


def test_the_shipped_demo_bundle_and_an_older_manifest_read_the_same_sampling(tmp_path):
    """The demo's manifest (rewritten by dh-export with unet_int8.onnx, so in the new ``sampling`` form) gives the
    engine's default, DDPM on 10 trailing steps with fresh noise; the same manifest written the older way (loose
    ``sampler``/``sampling_steps``/``frame_noise``/``spacing`` keys, as bundles made before 2026-12-07 are) reads
    into the same SamplerConfig."""
    from dheads.engine.bundle import MANIFEST, read_manifest

    demo = importlib.resources.files("dheads.engine") / "assets" / "demo"
    raw = json.loads((demo / MANIFEST).read_text())
    m = read_manifest(demo)
    assert m.diffusion.sampling == SamplerConfig("ddpm", 10, spacing="trailing", frame_noise="fresh")
    s = raw["diffusion"].pop("sampling")
    raw["diffusion"].update(sampler=s["name"], sampling_steps=s["steps"], frame_noise=s["frame_noise"],
                            spacing=s["spacing"])
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    assert read_manifest(tmp_path).diffusion == m.diffusion


def test_training_toml_sections_read_either_form():
    from dheads.engine.config import _from_dict, _to_dict

    d = _from_dict(DiffusionConfig, {"num_timesteps": 1000, "schedule": "cosine", "sampling_steps": 25,
                                     "sampler": "ddpm"})
    assert d.sampling == SamplerConfig("ddpm", 25)
    assert _from_dict(DiffusionConfig, _to_dict(d)) == d
