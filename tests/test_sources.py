"""Sources: frame conversion, spec parsing, stream names, and opening real, missing and broken files."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamtsm.capture import CameraSource, SyntheticSource, VideoSource, open_source, stream_name, to_bgr
from streamtsm.errors import ConfigError, SourceError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VIDEOS = DATA / "videos"


def _video(name: str) -> Path:
    path = VIDEOS / name
    if not path.exists():
        pytest.skip(f"../shared/data not present: {path} is needed for the real-video tests")
    return path


def _read_all(source) -> list[np.ndarray]:
    images = []
    while (image := source.read()) is not None:
        images.append(image)
        assert len(images) < 10_000, "source never ended"
    return images


# -- to_bgr -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image, value", [
    (np.full((5, 6), 7, np.uint8), 7),
    (np.full((5, 6, 1), 8, np.uint8), 8),
    (np.full((5, 6, 4), 9, np.uint8), 9),
    (np.full((5, 6, 3), 0xAB00, np.uint16), 0xAB),
    (np.full((5, 6), 0x1200, np.uint16), 0x12),
])
def test_to_bgr_converts_backend_layouts(image, value):
    bgr = to_bgr(image)
    assert bgr.shape == (5, 6, 3) and bgr.dtype == np.uint8
    assert np.all(bgr == value)


@pytest.mark.parametrize("image", [None, np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 3), np.float32),
                                   np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8), "image"])
def test_to_bgr_rejects_unusable_images(image):
    assert to_bgr(image) is None


def test_to_bgr_returns_bgr_unchanged_without_copy():
    image = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    assert to_bgr(image) is image


def test_to_bgr_drops_alpha_keeping_channel_order():
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 50
    assert to_bgr(bgra)[0, 0].tolist() == [10, 0, 200]


# -- open_source and stream_name --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, index", [(0, 0), (3, 3), ("2", 2), (" 1 ", 1)])
def test_open_source_digits_are_cameras(spec, index):
    source = open_source(spec)
    assert isinstance(source, CameraSource) and source.index == index
    assert source.is_live and source.name == f"camera {index}"


@pytest.mark.parametrize("spec, size, fps", [
    ("synthetic", (320, 240), 30.0),
    ("synthetic:160x120@15", (160, 120), 15.0),
    ("synthetic:64x48", (64, 48), 30.0),
    ("synthetic:64x48@7.5", (64, 48), 7.5),
])
def test_open_source_parses_synthetic_specs(spec, size, fps):
    source = open_source(spec)
    assert isinstance(source, SyntheticSource) and source.is_live
    assert (source.width, source.height) == size and source.fps == fps


@pytest.mark.parametrize("spec", ["synthetic:", "synthetic:abc", "synthetic:160x", "synthetic:160x120@",
                                  "synthetic:160x120@fast", "synthetic:4x4@10", "synthetic:160x120@0"])
def test_open_source_rejects_malformed_synthetic_spec(spec):
    with pytest.raises(ConfigError, match=re.escape(spec)) as info:
        open_source(spec)
    assert "synthetic:WIDTHxHEIGHT@FPS" in str(info.value) or "at least 8x8" in str(info.value)


@pytest.mark.parametrize("spec, live, sequence", [
    ("videos/sample.mp4", False, False),
    ("frames/img_%05d.jpg", False, True),
    ("rtsp://10.0.0.5/live", True, False),
    ("rtsps://cam.local/stream", True, False),
    ("http://10.0.0.5:8080/video.mjpg", True, False),
    ("https://example.org/live", True, False),
])
def test_open_source_classifies_files_sequences_and_urls(spec, live, sequence):
    source = open_source(spec)
    assert isinstance(source, VideoSource)
    assert source.is_live is live and source.is_sequence is sequence


def test_video_source_name_hides_url_password():
    source = open_source("rtsp://admin:secret@10.0.0.5:554/live")
    assert "secret" not in source.name and "10.0.0.5" in source.name


@pytest.mark.parametrize("spec, name", [
    (0, "cam0"),
    ("12", "cam12"),
    ("videos/sample.mp4", "sample"),
    ("/data/my clip (1).avi", "my-clip-1"),
    ("rtsp://10.0.0.5/live", "10-0-0-5-live"),
    ("rtsp://admin:secret@10.0.0.5:554/live/ch1", "10-0-0-5-554-live-ch1"),
    ("synthetic", "synthetic"),
    ("synthetic:160x120@15", "synthetic"),
    ("frames/img_%05d.jpg", "img"),
    ("frames/%06d.png", "frames"),
])
def test_stream_name_is_short_and_topic_safe(spec, name):
    assert stream_name(spec) == name


@given(st.text(max_size=40))
def test_stream_name_uses_only_topic_safe_characters(spec):
    assert re.fullmatch(r"[A-Za-z0-9_-]+", stream_name(spec))


# -- VideoSource ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count, size, fps", [
    ("sample.avi", 164, (240, 320), 25.0),
    ("sample.mp4", 300, (256, 340), 30.0),
    ("arm_wrestling.mp4", 280, (256, 340), 28.0),
])
def test_video_source_reads_every_frame_of_real_videos(name, count, size, fps):
    source = VideoSource(str(_video(name)))
    assert not source.is_live and source.name == f"file {name}"
    source.open()
    try:
        assert source.fps == pytest.approx(fps)
        images = _read_all(source)
    finally:
        source.release()
    assert len(images) == count
    assert all(image.shape == (*size, 3) and image.dtype == np.uint8 for image in images)
    source.release()  # idempotent


def test_video_source_reopen_starts_again():
    source = VideoSource(str(_video("sample.avi")))
    source.open()
    first = source.read()
    source.read()
    source.open()
    assert np.array_equal(source.read(), first)
    source.release()


def test_video_source_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(SourceError, match=re.escape(f"video file not found: {path}")):
        VideoSource(str(path)).open()


def test_video_source_undecodable_file_names_the_path(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 10)
    with pytest.raises(SourceError, match=re.escape(f"cannot decode video file {path}")):
        VideoSource(str(path)).open()


def test_video_source_folder_is_rejected(tmp_path):
    with pytest.raises(SourceError, match="expected a video file, got a folder"):
        VideoSource(str(tmp_path)).open()


def test_video_source_reads_image_sequence(tmp_path):
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"img_{i:05d}.png"), np.full((12, 16, 3), i * 40, np.uint8))
    source = VideoSource(str(tmp_path / "img_%05d.png"))
    assert not source.is_live and source.is_sequence
    source.open()
    images = _read_all(source)
    source.release()
    assert [int(image[0, 0, 0]) for image in images] == [0, 40, 80, 120, 160]


def test_video_source_empty_image_sequence_is_an_error(tmp_path):
    with pytest.raises(SourceError, match="no files match"):
        VideoSource(str(tmp_path / "img_%05d.png")).open()


def test_video_source_unreachable_stream_names_the_url():
    source = VideoSource("rtsp://127.0.0.1:1/live", timeout=1.0)
    with pytest.raises(SourceError, match=re.escape("cannot open stream rtsp://127.0.0.1:1/live")):
        source.open()


# -- CameraSource and SyntheticSource ---------------------------------------------------------------------------


def test_camera_source_missing_camera_names_it():
    source = CameraSource(99)
    with pytest.raises(SourceError, match="camera 99"):
        source.open()
    assert source.read() is None
    source.release()


def test_synthetic_source_gives_scene_frames_after_open():
    source = SyntheticSource(width=48, height=32, fps=1000.0, seed=2)
    assert source.read() is None
    source.open()
    images = [source.read() for _ in range(3)]
    assert all(image.shape == (32, 48, 3) and image.dtype == np.uint8 for image in images)
    assert np.array_equal(images[1], source.scene.render(1))
    assert source.position == 3
    source.release()
    source.release()
    assert source.read() is None


def test_synthetic_source_rejects_non_positive_fps():
    with pytest.raises(ConfigError, match="fps must be > 0"):
        SyntheticSource(fps=0)
