"""Sources: frame conversion, spec parsing, stream names, and opening real, missing and broken files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


# -- what a file fails to deliver ---------------------------------------------------------------------------------


def _mjpg(path: Path, frames: int = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    return path


def _opened(spec) -> VideoSource:
    source = VideoSource(str(spec))
    source.open()
    return source


def test_video_source_complete_file_reports_no_loss(tmp_path):
    source = _opened(_mjpg(tmp_path / "whole.avi"))
    assert len(_read_all(source)) == 30 and source.frame_count == 30
    assert source.losses() == []


def test_video_source_truncated_file_reports_the_frames_its_header_promised(tmp_path):
    whole = _mjpg(tmp_path / "whole.avi").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])  # the header still says 30 frames
    source = _opened(cut)
    read = len(_read_all(source))
    assert 0 < read < 30
    (loss,) = source.losses()
    assert (loss.kind, loss.frames) == ("truncated", 30 - read)
    assert "cut.avi" in loss.message and f"after {read} of the 30 frames" in loss.message


def test_video_source_corrupt_frame_mid_file_reports_a_loss(tmp_path):
    data = bytearray(_mjpg(tmp_path / "whole.avi").read_bytes())
    middle = len(data) // 2
    data[middle: middle + 2000] = np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    broken = tmp_path / "broken.avi"
    broken.write_bytes(bytes(data))
    source = _opened(broken)
    read = len(_read_all(source))
    assert read < 30, "the decoder dropped the corrupt frame"
    assert [(loss.kind, loss.frames) for loss in source.losses()] == [("truncated", 30 - read)]


def test_video_source_decode_error_is_reported(tmp_path):
    source = _opened(_mjpg(tmp_path / "whole.avi"))

    class RaisingCapture:
        def read(self):
            raise cv2.error("OpenCV(4) decoder: corrupt packet")

        def release(self):
            pass

    source.read()  # the frame decoded while opening
    source._capture.release()
    source._capture = RaisingCapture()  # a decoder that raises mid-file, as some backends do
    assert source.read() is None
    kinds = {loss.kind: loss for loss in source.losses()}
    assert set(kinds) == {"decode_error", "truncated"}
    assert "corrupt packet" in kinds["decode_error"].message and kinds["truncated"].frames == 29


def _sequence(folder: Path, numbers) -> str:
    for n in numbers:
        cv2.imwrite(str(folder / f"img_{n:05d}.jpg"), np.full((16, 16, 3), n * 10, np.uint8))
    return str(folder / "img_%05d.jpg")


def test_video_source_image_sequence_gap_reports_the_unread_files(tmp_path):
    (tmp_path / "img_7.jpg").write_bytes(b"not of the pattern")  # %05d does not name it: ignored
    source = _opened(_sequence(tmp_path, [1, 2, 5]))
    assert len(_read_all(source)) == 2  # OpenCV stops at the missing number 3
    (loss,) = source.losses()
    # Numbers 3 to 5 never reached the model: two missing, one file not read.
    assert (loss.kind, loss.frames) == ("gap", 3)
    assert "number 3 is missing" in loss.message and "1 later files (up to number 5)" in loss.message


def test_video_source_image_sequence_without_gap_reports_no_loss(tmp_path):
    source = _opened(_sequence(tmp_path, [1, 2, 3]))
    assert len(_read_all(source)) == 3
    assert source.losses() == []


@pytest.mark.parametrize("name", ["sample.mp4", "sample.avi", "arm_wrestling.mp4"])
def test_video_source_real_clips_report_no_loss(name):
    source = _opened(_video(name))
    assert len(_read_all(source)) == source.frame_count
    assert source.losses() == []


def test_video_source_network_stream_reports_no_loss():
    assert VideoSource("rtsp://10.0.0.5/live").losses() == []


# -- native libraries keep quiet ----------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "streamtsm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def _not_a_video(tmp_path: Path) -> str:
    path = tmp_path / "notes.mp4"  # FFmpeg's mp4 demuxer complains about it on stderr ("moov atom not found")
    path.write_text("these are meeting notes, not a video\n" * 20)
    return str(path)


@pytest.mark.parametrize("kind", ["file", "camera"])
def test_cli_run_bad_source_is_one_error_line_without_native_noise(tmp_path, kind):
    # A camera index that names no device: OpenCV's V4L2 and FFmpeg backends each print a warning for it.
    source, named = (_not_a_video(tmp_path), "notes.mp4") if kind == "file" else ("99", "camera 99")
    result = _run_cli("run", "--source", source, "--startup-timeout", "1")  # a camera is retried until then
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    # Exactly one line: nothing from OpenCV, FFmpeg or onnxruntime, and no note or banner before the sources open.
    assert len(lines) == 1 and lines[0].startswith("streamtsm: error:") and named in lines[0], lines


def test_cli_run_bad_file_with_debug_log_level_lets_native_messages_through(tmp_path):
    result = _run_cli("--log-level", "DEBUG", "run", "--source", _not_a_video(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("streamtsm: error:")
    assert [line for line in lines if line.startswith("[")], "FFmpeg's own line, e.g. [mov,mp4,...] moov atom"
