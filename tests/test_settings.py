"""Run settings: the defaults written once, and the rule "command line beats site file beats defaults"."""

from __future__ import annotations

import dataclasses

import pytest

from streamtsm.cli import build_parser
from streamtsm.pipeline import PipelineOptions
from streamtsm.settings import RUN_DEFAULTS, merge_settings
from streamtsm.siteconfig import CameraConfig


def test_merge_settings_command_line_beats_site_file_beats_defaults():
    merged = merge_settings({"smooth": 6, "topk": None}, {"smooth": 4, "topk": 2}, names=["smooth", "topk", "hold"])
    assert merged == {"smooth": 6, "topk": 2, "hold": RUN_DEFAULTS["hold"]}


def test_merge_settings_none_means_not_given_but_false_and_zero_are_values():
    merged = merge_settings({"realtime": False, "threshold": 0.0, "publish": None}, {"publish": "tcp://*:1"},
                            names=["realtime", "threshold", "publish"])
    assert merged == {"realtime": False, "threshold": 0.0, "publish": "tcp://*:1"}


def test_merge_settings_a_name_without_default_is_none_and_a_missing_layer_is_skipped():
    assert merge_settings(None, {"connect": None}, names=["connect", "metrics_port"]) == {
        "connect": None, "metrics_port": None}


def test_merge_settings_without_names_gives_every_default_and_every_given_name():
    merged = merge_settings({"quiet": True}, {"smooth": 3})
    assert set(merged) == set(RUN_DEFAULTS) | {"quiet"}
    assert merged["quiet"] is True and merged["smooth"] == 3 and merged["topk"] == RUN_DEFAULTS["topk"]


def test_merge_settings_takes_other_defaults():
    assert merge_settings({"a": None}, names=["a", "b"], defaults={"a": 1}) == {"a": 1, "b": None}


def test_run_defaults_cannot_be_changed_in_place():
    with pytest.raises(TypeError):
        RUN_DEFAULTS["smooth"] = 1  # type: ignore[index]


def test_pipeline_options_defaults_are_the_run_defaults():
    options = PipelineOptions()
    for f in dataclasses.fields(PipelineOptions):
        expected = RUN_DEFAULTS[f.name]
        value = getattr(options, f.name)
        assert (list(value) if f.name == "background" else value) == (list(expected) if f.name == "background"
                                                                        else expected), f.name


def test_pipeline_options_from_settings_takes_its_fields_and_ignores_the_rest():
    options = PipelineOptions.from_settings({"smooth": 2, "background": ("still",), "publish": "none",
                                             "max_frames": None})
    assert options == dataclasses.replace(PipelineOptions(), smooth=2, background=["still"])


def test_camera_config_defaults_are_the_run_defaults():
    cam = CameraConfig(id="c", source=0)
    assert (cam.device, cam.backend, cam.clip_stride) == (RUN_DEFAULTS["device"], RUN_DEFAULTS["backend"],
                                                          RUN_DEFAULTS["clip_stride"])


def test_run_parser_leaves_every_defaulted_option_unset():
    # The merge can only tell a given option from a left-out one if the parser's default is None (or False for a
    # flag, which is the same as its built-in default).
    args = vars(build_parser().parse_args(["run"]))
    for name in RUN_DEFAULTS:
        if name in args:
            assert args[name] is None or args[name] is RUN_DEFAULTS[name], name
