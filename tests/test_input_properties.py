"""Properties of the input checks: whatever a site config or a run option holds, the answer is a checked value or one
ConfigError of one line, never another exception; and every stream id, however derived, follows the one rule."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamtsm.capture import stream_name
from streamtsm.cli import build_parser, check_options
from streamtsm.errors import ConfigError
from streamtsm.settings import RANGES, check_setting
from streamtsm.siteconfig import SiteConfig, load_site_config
from streamtsm.stream_ids import check_stream_id, is_stream_id, sanitize_stream_id, unique_stream_id

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# TOML values of every kind, nested: what a hand-edited or generated config may put under any key.
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)  # TOML strings hold no lone surrogates
_SCALARS = st.one_of(st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
                     st.floats(allow_nan=True, allow_infinity=True), _TEXT)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(_TEXT, inner, max_size=4)),
                       max_leaves=12)
_CAMERA_KEYS = ["id", "source", "model", "weights", "onnx", "labels", "device", "providers", "backend", "url",
                "triton_model", "frame_stride", "crop", "clip_stride"]
_OPTION_KEYS = ["smooth", "topk", "threshold", "hold", "background"]


def _toml_value(value) -> str:
    """``value`` written as TOML (inline tables and arrays; floats as TOML spells nan and inf)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def _site_documents(draw) -> str:
    parts = []
    for table, keys in (("publish", ["endpoint", "connect"]), ("metrics", ["port", "addr"]),
                        ("defaults", _CAMERA_KEYS[2:] + _OPTION_KEYS)):
        if draw(st.booleans()):
            chosen = draw(st.dictionaries(st.sampled_from(keys), _VALUES, max_size=3))
            parts.append(f"[{table}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in chosen.items()))
    for _ in range(draw(st.integers(0, 3))):
        camera = {"id": draw(st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True), _VALUES)),
                  "source": draw(st.one_of(st.just("synthetic"), st.integers(-5, 2000), _VALUES))}
        camera.update(draw(st.dictionaries(st.sampled_from(_CAMERA_KEYS + ["nonsense"]), _VALUES, max_size=3)))
        parts.append("[[camera]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in camera.items()))
    return "\n".join(parts)


def _one_line_or_site(path, data: bytes):
    path.write_bytes(data)
    try:
        return load_site_config(path)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return e


@FAST
@given(text=_site_documents())
def test_load_site_config_of_any_document_is_a_site_or_one_config_error(tmp_path, text):
    tomllib.loads(text)  # the generator writes valid TOML: the loader's checks are what is tested
    result = _one_line_or_site(tmp_path / "site.toml", text.encode())
    assert isinstance(result, (SiteConfig, ConfigError))
    if isinstance(result, SiteConfig):
        assert all(is_stream_id(cam.id) for cam in result.cameras)


@FAST
@given(data=st.binary(max_size=200))
def test_load_site_config_of_any_bytes_is_a_site_or_one_config_error(tmp_path, data):
    assert isinstance(_one_line_or_site(tmp_path / "site.toml", data), (SiteConfig, ConfigError))


_NUMBERS = st.one_of(st.integers(min_value=-10**30, max_value=10**30), st.floats(allow_nan=True, allow_infinity=True))


@FAST
@given(option=st.sampled_from(["max-frames", "duration", "stats-interval", "threshold", "topk", "hold", "smooth",
                                "frame-stride", "clip-stride", "threads", "metrics-port", "camera"]),
       value=_NUMBERS)
def test_run_option_of_any_number_is_accepted_in_range_or_one_config_error(option, value):
    try:
        args = build_parser().parse_args(["run", f"--{option}={value}"])
    except SystemExit:  # argparse's own refusal (a float for an integer option): exit 2 with its usage line
        return
    name = "camera" if option == "camera" else option.replace("-", "_")
    rule = RANGES[name]
    try:
        check_options(args)
    except ConfigError as e:
        assert "\n" not in str(e) and f"--{option}" in str(e)
        return
    given_value = args.sources[0] if option == "camera" else getattr(args, name)
    assert rule.low <= given_value <= rule.high


@FAST
@given(name=st.sampled_from(sorted(RANGES)), value=st.one_of(_NUMBERS, _VALUES))
def test_check_setting_of_any_value_returns_it_or_raises_one_config_error(name, value):
    try:
        assert check_setting(name, value) is value
    except ConfigError as e:
        assert "\n" not in str(e) and name in str(e)


@FAST
@given(raw=st.text(max_size=200))
def test_sanitize_stream_id_of_any_text_follows_the_rule(raw):
    assert is_stream_id(sanitize_stream_id(raw))
    if is_stream_id(raw) and raw.strip("-_") == raw and "--" not in raw:
        assert sanitize_stream_id(raw) == raw


@FAST
@given(spec=st.one_of(st.text(max_size=200), st.integers(min_value=0, max_value=1023),
                      st.builds(lambda host, path: f"rtsp://{host}/{path}", st.text(max_size=30),
                                st.text(max_size=100))))
def test_stream_name_of_any_source_follows_the_rule(spec):
    assert is_stream_id(stream_name(spec))


@FAST
@given(name=st.text(max_size=80))
def test_check_stream_id_refuses_any_id_that_could_form_another_topic(name):
    try:
        assert check_stream_id(name, "--name") == name
    except ConfigError as e:
        assert "\n" not in str(e) and "--name" in str(e)
    else:
        assert "." not in name and all(c.isascii() and c.isprintable() for c in name)


def test_unique_stream_id_keeps_derived_ids_apart():
    taken = {"x", "x-2", "y" * 64}
    assert unique_stream_id("x", taken) == "x-3"
    assert unique_stream_id("z", taken) == "z"
    long = unique_stream_id("y" * 64, taken)
    assert is_stream_id(long) and long.endswith("-2") and len(long) == 64


@pytest.mark.parametrize("spec,expected", [("rtsp://10.0.0.5/a.b\tc", "10-0-0-5-a-bc"), ("rtsp://[x/a", "rtsp-x-a"),
                                           ("ü.mp4", "stream"), ("rtsp://h/" + "p" * 300, "h-" + "p" * 62)])
def test_stream_name_sanitizes_derived_ids(spec, expected):
    assert stream_name(spec) == expected
