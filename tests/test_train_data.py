"""Training data: annotation lists, class folders, TSN/dense sampling, transforms, decoding, skipped videos, the
synthetic dataset writer, and the loop's pieces (schedule, partial BN, optimizer state in checkpoints)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from streamtsm.errors import ConfigError
from streamtsm.models import create, read_checkpoint, save_checkpoint
from streamtsm.preprocess import Preprocessor
from streamtsm.synthetic import MOTIONS, render_clip
from streamtsm.labels import read_labels
from streamtsm.train.annotations import VideoRecord, read_annotations, scan_folders
from streamtsm.train.data import ClipDataset, MatchedBatchSampler, Skipped, collate_clips
from streamtsm.train.optim import EpochScheduler, apply_partial_bn, lr_factor, param_groups, set_partial_bn
from streamtsm.train.sampling import DenseSampler, SegmentSampler, sampler_for
from streamtsm.train.synthdata import scene_rng, write_synthetic_dataset
from streamtsm.train.transforms import (TestTransform, TrainTransform, flip_label_map, mirrored_pairs,
                                        multi_scale_crop_box)
from streamtsm.train.video import count_frames, read_frames


def _write_video(path, frames, fps=30):
    writer = cv2.VideoWriter(str(path), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), fps,
                             (frames.shape[2], frames.shape[1]))
    for f in frames:
        writer.write(f)
    writer.release()


def _numbered_frames(n, h=24, w=32):
    """Frames whose mean grey level encodes their index (survives JPEG)."""
    return np.stack([np.full((h, w, 3), 10 + 12 * i, np.uint8) for i in range(n)])


def _index_of(frame):
    return int(round((frame.mean() - 10) / 12))


# -- annotation lists and folders ---------------------------------------------------------------------------


def test_read_annotations_video_list_relative_to_its_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    ann = tmp_path / "lists" / "train.txt"
    ann.write_text("# comment\n\nvids/a.mp4 0\nvids/my clip.avi 2\n/abs/c.mp4 1\n")
    records = read_annotations(ann)
    assert [r.path for r in records] == [str(tmp_path / "lists/vids/a.mp4"), str(tmp_path / "lists/vids/my clip.avi"),
                                         "/abs/c.mp4"]
    assert [r.label for r in records] == [0, 2, 1] and all(r.kind == "video" for r in records)
    rooted = read_annotations(ann, data_root=tmp_path / "data")
    assert rooted[0].path == str(tmp_path / "data/vids/a.mp4")


def test_read_annotations_rawframes_list(tmp_path):
    ann = tmp_path / "val.txt"
    ann.write_text("frames/v1 120 3\nframes/v2 7 0\n")
    records = read_annotations(ann)
    assert [(r.num_frames, r.label, r.kind) for r in records] == [(120, 3, "frames"), (7, 0, "frames")]


@pytest.mark.parametrize("text, match", [("a.mp4\n", "train.txt:1"), ("a.mp4 zero\n", "train.txt:1"),
                                         ("ok.mp4 1\nbad.mp4 x\n", "train.txt:2"), ("# only\n", "no entries")])
def test_read_annotations_rejects_bad_lines_naming_the_line(tmp_path, text, match):
    ann = tmp_path / "train.txt"
    ann.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_annotations(ann)


def test_read_annotations_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_annotations(tmp_path / "nope.txt")


def test_scan_folders_sorts_classes_and_finds_videos_and_frame_dirs(tmp_path):
    (tmp_path / "wave").mkdir()
    _write_video(tmp_path / "wave" / "w1.avi", _numbered_frames(3))
    (tmp_path / "clap" / "c1").mkdir(parents=True)
    for i in range(1, 5):
        cv2.imwrite(str(tmp_path / "clap" / "c1" / f"img_{i:05d}.jpg"), _numbered_frames(1)[0])
    (tmp_path / "clap" / "notes.txt").write_text("not a video")
    records, labels = scan_folders(tmp_path)
    assert labels == ["clap", "wave"]
    assert [(r.label, r.kind, r.num_frames) for r in records] == [(0, "frames", 4), (1, "video", None)]
    with pytest.raises(ConfigError, match="not in the 1 labels"):
        scan_folders(tmp_path, labels=["wave"])


def test_read_labels_rejects_empty_and_repeated(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n\n")
    assert read_labels(tmp_path / "a.txt") == ["x", "y"]
    (tmp_path / "b.txt").write_text("x\nx\n")
    with pytest.raises(ConfigError, match="repeats"):
        read_labels(tmp_path / "b.txt")


# -- sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [8, 17, 100])
def test_segment_sampler_train_takes_one_frame_in_each_segment(num_frames):
    sampler = SegmentSampler(8)
    rng = np.random.default_rng(0)
    tick = num_frames / 8
    for _ in range(20):
        (idx,) = sampler(num_frames, True, rng)
        assert len(idx) == 8
        for k, i in enumerate(idx):
            assert int(k * tick) <= i < max(int((k + 1) * tick), int(k * tick) + 1)


def test_segment_sampler_test_takes_centres_and_twice_adds_starts():
    (centre,) = SegmentSampler(4)(40, False, None)
    assert centre.tolist() == [5, 15, 25, 35]
    views = SegmentSampler(4, twice_sample=True)(40, False, None)
    assert [v.tolist() for v in views] == [[5, 15, 25, 35], [0, 10, 20, 30]]
    clips = SegmentSampler(4, num_clips=2)(40, False, None)
    assert [v.tolist() for v in clips] == [[2, 12, 22, 32], [7, 17, 27, 37]]


def test_segment_sampler_short_video_loops_or_repeats_last():
    assert SegmentSampler(6, short="loop")(4, True, np.random.default_rng(0))[0].tolist() == [0, 1, 2, 3, 0, 1]
    assert SegmentSampler(6, short="repeat_last")(4, False, None)[0].tolist() == [0, 1, 2, 3, 3, 3]


def test_dense_sampler_random_start_when_training_centred_when_testing():
    sampler = DenseSampler(clip_len=4, frame_interval=2)
    rng = np.random.default_rng(0)
    starts = {int(sampler(20, True, rng)[0][0]) for _ in range(200)}
    assert starts == set(range(0, 20 - 7 + 1))
    clip = sampler(20, True, rng)[0]
    assert np.array_equal(np.diff(clip), [2, 2, 2])
    (clip,) = sampler(20, False, None)
    assert clip.tolist() == [6, 8, 10, 12]
    spread = DenseSampler(4, 2, num_clips=3)(20, False, None)
    assert [int(v[0]) for v in spread] == [2, 7, 11]
    assert DenseSampler(4, 2, short="repeat_last")(5, False, None)[0].tolist() == [0, 2, 4, 4]


def test_sampler_for_picks_segments_for_tsm_and_dense_for_clip_models_without_segments():
    tsm = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25)
    assert sampler_for(tsm) == SegmentSampler(8)
    assert sampler_for(tsm, train=False, num_clips=3, twice_sample=True) == SegmentSampler(8, 3, True)
    assert sampler_for(tsm, sampling="dense") == DenseSampler(8, 1)

    class ClipModel(torch.nn.Module):
        cfg = create("tsm_r18", num_classes=3, width=8).cfg.__class__(name="x", kind="clip", num_classes=3,
                                                                       clip_len=4, frame_interval=6)

    assert sampler_for(ClipModel()) == DenseSampler(4, 6)


# -- transforms ---------------------------------------------------------------------------------------------


def test_multi_scale_crop_sizes_are_scales_of_the_short_side():
    rng = np.random.default_rng(0)
    allowed = {int(120 * s) for s in (1, 0.875, 0.75, 0.66)} | {112}
    for _ in range(100):
        x, y, w, h = multi_scale_crop_box(120, 160, 112, rng)
        assert w in allowed and h in allowed and x + w <= 160 and y + h <= 120 and x >= 0 and y >= 0


def test_train_transform_shapes_and_flip_label_map():
    frames = np.zeros((4, 30, 40, 3), np.uint8)
    frames[:, :, :20] = 255  # bright left half
    t = TrainTransform(16, 18, (0.5,) * 3, (0.5,) * 3, scales=(1.0,), flip=True, flip_label_map={0: 1, 1: 0})
    seen = {}
    for seed in range(20):
        clip, label = t(frames, 0, np.random.default_rng(seed))
        assert clip.shape == (4, 3, 16, 16) and clip.dtype == np.float32
        left_bright = clip[0, 0, :, :4].mean() > clip[0, 0, :, -4:].mean()
        seen[left_bright] = label
    assert seen == {True: 0, False: 1}  # mirrored clips got the swapped label
    no_flip = TrainTransform(16, 18, (0.5,) * 3, (0.5,) * 3)
    assert all(no_flip(frames, 0, np.random.default_rng(s))[1] == 0 for s in range(10))


def test_mirrored_pairs_of_the_motions():
    pairs = mirrored_pairs(MOTIONS)
    assert pairs == [("move_left", "move_right"), ("rotate_cw", "rotate_ccw")]
    assert flip_label_map(MOTIONS, pairs) == {0: 1, 1: 0, 6: 7, 7: 6}


def test_test_transform_one_crop_is_the_live_preprocessing_and_three_crops_cover_the_width():
    cfg = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, input_size=32, resize_size=36).cfg
    frames = np.random.default_rng(0).integers(0, 255, (2, 48, 80, 3), dtype=np.uint8)
    one = TestTransform(cfg, 1)(frames)
    assert one.shape == (1, 2, 3, 32, 32)
    np.testing.assert_array_equal(one[0, 1], Preprocessor.for_config(cfg)(frames[1]))
    three = TestTransform(cfg, 3)(frames)
    assert three.shape == (3, 2, 3, 32, 32)
    resized = cv2.resize(frames[0], (53, 32), interpolation=cv2.INTER_AREA)
    rgb = resized[:, -32:, ::-1].astype(np.float32) / 255
    expect = ((rgb - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(three[2, 0], expect, atol=1e-5)


# -- decoding and the dataset -------------------------------------------------------------------------------


def test_read_frames_decodes_the_requested_indices_in_order(tmp_path):
    path = tmp_path / "v.avi"
    _write_video(path, _numbered_frames(12))
    record = VideoRecord(str(path), 0)
    assert count_frames(record) == 12
    frames = read_frames(record, np.array([7, 0, 7, 11]))
    assert [_index_of(f) for f in frames] == [7, 0, 7, 11]
    assert _index_of(read_frames(record, np.array([15]))[0]) == 11  # past the end: the last frame


def test_read_frames_of_a_frame_directory_uses_the_template(tmp_path):
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"frame{i:03d}.png"), _numbered_frames(5)[i])
    record = VideoRecord(str(tmp_path), 0, 5)
    frames = read_frames(record, np.array([4, 1]), frame_template="frame{:03d}.png", start_index=0)
    assert [_index_of(f) for f in frames] == [4, 1]


def test_dataset_skips_unreadable_videos_and_collate_reports_them(tmp_path):
    good = tmp_path / "good.avi"
    _write_video(good, _numbered_frames(10))
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all")
    cfg = create("tsm_mobilenetv2_online", num_classes=2, width_mult=0.25, num_segments=4, input_size=16,
                 resize_size=18).cfg
    records = [VideoRecord(str(good), 0), VideoRecord(str(bad), 1), VideoRecord(str(tmp_path / "gone.mp4"), 1)]
    dataset = ClipDataset(records, SegmentSampler(4), TrainTransform.for_config(cfg), train=True)
    assert isinstance(dataset[1], Skipped) and isinstance(dataset[2], Skipped)
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate_clips))
    assert len(batches) == 1 and len(batches[0]) == 1
    assert batches[0].clips.shape == (1, 4, 3, 16, 16)
    assert sorted(s.path for s in batches[0].skipped) == sorted([str(bad), str(tmp_path / "gone.mp4")])
    empty = collate_clips([Skipped("x", "y")])
    assert len(empty) == 0 and empty.skipped == [Skipped("x", "y")]


def test_dataset_test_mode_returns_clips_times_crops_views():
    frames = np.random.default_rng(0).integers(0, 255, (20, 24, 32, 3), dtype=np.uint8)
    cfg = create("tsm_mobilenetv2_online", num_classes=2, width_mult=0.25, num_segments=4, input_size=16,
                 resize_size=18).cfg
    dataset = ClipDataset([VideoRecord("mem", 1, frames=frames)], SegmentSampler(4, num_clips=2, twice_sample=True),
                          TestTransform(cfg, 3), train=False)
    views, label = dataset[0]
    assert views.shape == (2 * 2 * 3, 4, 3, 16, 16) and label == 1


def test_dataset_draws_are_repeatable_by_torch_seed():
    frames = np.random.default_rng(0).integers(0, 255, (30, 24, 32, 3), dtype=np.uint8)
    cfg = create("tsm_mobilenetv2_online", num_classes=2, width_mult=0.25, num_segments=4, input_size=16,
                 resize_size=18).cfg
    dataset = ClipDataset([VideoRecord("mem", 0, frames=frames)], SegmentSampler(4), TrainTransform.for_config(cfg),
                          train=True)
    torch.manual_seed(3)
    first = dataset[0][0]
    torch.manual_seed(3)
    assert torch.equal(first, dataset[0][0])


# -- the synthetic dataset ----------------------------------------------------------------------------------


def test_write_synthetic_dataset_is_deterministic_and_readable(tmp_path):
    meta = write_synthetic_dataset(tmp_path / "a", clips_per_class=3, frames=6, size="40x32", seed=5,
                                   val_fraction=0.34, classes=["move_up", "still"])
    assert meta["train_clips"] == 4 and meta["val_clips"] == 2
    assert (tmp_path / "a" / "labels.txt").read_text() == "move_up\nstill\n"
    records = read_annotations(tmp_path / "a" / "train.txt")
    assert [r.label for r in records] == [0, 0, 1, 1]
    frames = read_frames(records[0], np.arange(6))
    assert frames.shape == (6, 32, 40, 3)
    # The clip of (seed, scene, motion) is render_clip's clip from the scene's generator, whatever the classes.
    expect = render_clip("move_up", 6, 40, 32, scene_rng(5, 0))
    assert np.abs(frames.astype(float) - expect).mean() < 20  # JPEG error only
    write_synthetic_dataset(tmp_path / "b", clips_per_class=3, frames=6, size="40x32", seed=5, val_fraction=0.34)
    again = read_frames(read_annotations(tmp_path / "b" / "train.txt")[MOTIONS.index("move_up") * 2], np.arange(6))
    np.testing.assert_array_equal(frames, again)
    # A scene's clips share their look: the middle frames of its move_up and still clips are the same picture.
    still = read_frames(records[2], np.arange(6))
    assert records[2].scene_key == records[0].scene_key == "scene_0000.avi"
    assert np.abs(still[0].astype(float) - frames[0]).mean() > 1  # the shape is elsewhere at the start...
    assert np.abs(still[3].astype(float) - frames[3]).mean() < np.abs(still[0].astype(float) - frames[0]).mean()


@pytest.mark.parametrize("kwargs, match", [({"classes": ["jump"]}, "unknown class"), ({"size": "0x4"}, "at least"),
                                           ({"val_fraction": 1.0}, "val fraction"), ({"size": "big"}, "size must")])
def test_write_synthetic_dataset_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        write_synthetic_dataset(tmp_path, clips_per_class=1, frames=2, **kwargs)


# -- loop pieces --------------------------------------------------------------------------------------------


def test_lr_factor_warmup_step_and_cosine():
    kw = {"epochs": 10, "warmup_epochs": 1}
    assert lr_factor(0.5, schedule="step", lr_steps=[5, 8], **kw) == pytest.approx(0.5)
    assert lr_factor(1.0, schedule="step", lr_steps=[5, 8], **kw) == pytest.approx(1.0)
    assert lr_factor(5.0, schedule="step", lr_steps=[5, 8], **kw) == pytest.approx(0.1)
    assert lr_factor(8.5, schedule="step", lr_steps=[5, 8], **kw) == pytest.approx(0.01)
    assert lr_factor(1.0, schedule="cosine", lr_steps=[], **kw) == pytest.approx(1.0)
    assert lr_factor(5.5, schedule="cosine", lr_steps=[], **kw) == pytest.approx(0.5)
    assert lr_factor(10.0, schedule="cosine", lr_steps=[], **kw) == pytest.approx(0.0, abs=1e-9)


def test_matched_batch_sampler_batches_one_scene_in_every_class():
    records = [VideoRecord(f"videos/{c}/scene_{i}.avi", label) for i in range(4)
               for label, c in enumerate(("a", "b", "c"))]
    records.append(VideoRecord("videos/a/lonely.avi", 0))  # a scene in one class only makes no batch
    sampler = MatchedBatchSampler(records, generator=torch.Generator().manual_seed(0))
    batches = [[i for i, _ in b] for b in sampler]
    assert len(batches) == len(sampler) == 4
    for batch in batches:
        assert sorted(records[i].label for i in batch) == [0, 1, 2]
        assert len({records[i].scene_key for i in batch}) == 1
    assert sorted(i for b in batches for i in b) == list(range(12))
    # Two scenes per batch of 4: two classes of each scene.
    mixed = list(MatchedBatchSampler(records, 2, 4, generator=torch.Generator().manual_seed(0)))
    assert len(mixed) == 2
    for batch in mixed:
        scenes = [records[i].scene_key for i, _ in batch]
        assert len(batch) == 4 and len(set(scenes)) == 2 and all(scenes.count(k) == 2 for k in scenes)
        seeds = {records[i].scene_key: set() for i, _ in batch}
        for i, seed in batch:
            seeds[records[i].scene_key].add(seed)
        assert all(len(v) == 1 for v in seeds.values())  # a scene's clips share their random draws
    with pytest.raises(ConfigError, match="scenes shown in several classes"):
        MatchedBatchSampler([VideoRecord("a/x.avi", 0), VideoRecord("b/y.avi", 1)])


def test_partial_bn_freezes_every_bn_but_the_first():
    model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, num_segments=2)
    frozen = set_partial_bn(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen == bns[1:]
    before = [bn.running_mean.clone() for bn in bns]
    model.train()
    apply_partial_bn(frozen)
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before[0], bns[0].running_mean)
    assert all(torch.equal(b, bn.running_mean) for b, bn in zip(before[1:], bns[1:]))
    trainable = {id(p) for g in param_groups(model, 5e-4) for p in g["params"]}
    assert all(id(p) not in trainable for bn in bns[1:] for p in bn.parameters())


def test_optimizer_and_scheduler_state_survive_a_weights_only_checkpoint(tmp_path):
    model = create("tsm_mobilenetv2_online", num_classes=3, width_mult=0.25, num_segments=2)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    sched = EpochScheduler(opt, lambda e: 0.5 ** e)
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    sched.step(1.5)
    save_checkpoint(model, tmp_path / "c.pth", extra={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    extra = read_checkpoint(tmp_path / "c.pth")["extra"]  # torch.load(weights_only=True)
    opt2 = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    opt2.load_state_dict(extra["optimizer"])
    sched2 = EpochScheduler(opt2, lambda e: 0.5 ** e)
    sched2.load_state_dict(extra["scheduler"])
    assert sched2.progress == 1.5 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 1.5)
    buf = [s["momentum_buffer"] for s in opt.state.values()]
    buf2 = [s["momentum_buffer"] for s in opt2.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(buf, buf2)) and len(buf) == len(buf2) > 0


def test_dataset_first_readable_finds_the_first_clip_that_decodes(tmp_path):
    good = tmp_path / "good.avi"
    _write_video(good, _numbered_frames(10))
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all")
    cfg = create("tsm_mobilenetv2_online", num_classes=2, width_mult=0.25, num_segments=4, input_size=16,
                 resize_size=18).cfg

    def dataset(*paths):
        return ClipDataset([VideoRecord(str(p), 0) for p in paths], SegmentSampler(4), TrainTransform.for_config(cfg),
                           train=True)

    assert dataset(good, bad).first_readable() == (0, None)
    index, failure = dataset(bad, tmp_path / "gone.mp4", good).first_readable()
    assert index == 2 and failure.path == str(bad)
    index, failure = dataset(bad, tmp_path / "gone.mp4").first_readable()
    assert index is None and failure.path == str(bad) and failure.reason
    before = torch.random.get_rng_state()
    dataset(bad, good).first_readable()
    assert torch.equal(torch.random.get_rng_state(), before), "probing draws nothing from the run's generator"
