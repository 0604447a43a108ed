"""`streamtsm synth`, `streamtsm train` and `streamtsm eval` end to end on a tiny synthetic dataset: the files and
logs a run writes, resume reproducing an uninterrupted run, the eval protocols' report, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from streamtsm.cli import main
from streamtsm.models import load, read_checkpoint

CLASSES = ["move_left", "move_right", "still"]
COMMON = ["--batch-size", "3", "--lr", "0.02", "--lr-steps", "1", "--workers", "0", "--no-progress", "--device", "cpu", "--seed", "1"]
TINY = ["--model", "tsm_mobilenetv2_online", "--width-mult", "0.25", "--input-size", "32", "--num-segments", "4",
        *COMMON]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--clips-per-class", "4", "--frames", "8", "--size", "40x32",
                 "--val-fraction", "0.25", "--classes", *CLASSES]) == 0
    return root


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_synth_writes_videos_lists_and_labels(dataset):
    assert (dataset / "labels.txt").read_text().split() == CLASSES
    train = (dataset / "train.txt").read_text().splitlines()
    val = (dataset / "val.txt").read_text().splitlines()
    assert len(train) == 9 and len(val) == 3
    assert all((dataset / line.split()[0]).is_file() for line in train + val)
    assert json.loads((dataset / "synth.json").read_text())["frames"] == 8


def test_train_writes_checkpoints_logs_and_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    data = ["--train", str(dataset / "train.txt"), "--val", str(dataset / "val.txt")]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *TINY, *data, "--epochs", "2", "--out", str(straight)]) == 0
    assert main(["train", *TINY, *data, "--epochs", "1", "--out", str(split)]) == 0
    # --epochs 2 with --resume: continue the 1-epoch run's schedule to epoch 2 (the model comes from the checkpoint).
    assert main(["train", *COMMON, *data, "--epochs", "2", "--out", str(split),
                 "--resume", str(split / "checkpoint.pth")]) == 0

    for run in (straight, split):
        assert {p.name for p in run.iterdir()} >= {"checkpoint.pth", "best.pth", "log.jsonl", "labels.txt"}
        epochs = [r for r in _log(run) if r["event"] == "epoch"]
        assert [r["epoch"] for r in epochs] == [1, 2]
        assert all({"top1", "top5", "mean_class_acc"} <= set(r["val"]) for r in epochs)
        assert all(r["clips_per_s"] > 0 and r["skipped"] == 0 for r in epochs)
        final = _log(run)[-1]
        assert final["event"] == "final" and final["labels"] == CLASSES
    a = read_checkpoint(straight / "checkpoint.pth")
    b = read_checkpoint(split / "checkpoint.pth")
    assert a["extra"]["epoch"] == b["extra"]["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    model = load(straight / "best.pth")
    assert model.cfg.labels == CLASSES and model.cfg.arch["shift_mode"] == "unidirectional"
    assert model.cfg.input_size == 32 and model.num_segments == 4


def test_dense_training_records_its_clips_so_run_and_eval_sample_the_same_way(dataset, tmp_path, capsys):
    dense, segments = tmp_path / "dense", tmp_path / "segments"
    assert main(["train", *TINY, "--train", str(dataset / "train.txt"), "--epochs", "1", "--sampling", "dense",
                 "--frame-interval", "2", "--scales", "1", "0.875", "--out", str(dense)]) == 0
    # --frame-interval means nothing to TSN segment sampling, so it is not recorded there.
    assert main(["train", *TINY, "--train", str(dataset / "train.txt"), "--epochs", "1", "--frame-interval", "2",
                 "--out", str(segments)]) == 0
    model = load(dense / "checkpoint.pth")
    assert model.cfg.frame_interval == 2 and model.cfg.clip_len == 4 and model.cfg.kind == "online"
    assert load(segments / "checkpoint.pth").cfg.frame_interval == 1
    start = _log(dense)[0]
    assert start["sampler"] == "DenseSampler" and start["options"]["scales"] == [1.0, 0.875]
    for run, kind in ((dense, "dense"), (segments, "segments")):
        capsys.readouterr()
        assert main(["eval", "--weights", str(run / "best.pth"), "--val", str(dataset / "val.txt"), "--workers", "0",
                     "--json", "-"]) == 0
        protocol = json.loads(capsys.readouterr().out.splitlines()[-1])["protocol"]
        assert protocol["sampling"]["kind"] == kind
        if kind == "dense":
            assert (protocol["sampling"]["clip_len"], protocol["sampling"]["frame_interval"]) == (4, 2)


def test_resume_with_another_optimizer_is_one_clear_error(dataset, tmp_path, capsys):
    run = tmp_path / "adamw"
    data = ["--train", str(dataset / "train.txt")]
    assert main(["train", *TINY, *data, "--epochs", "1", "--optimizer", "adamw", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", *COMMON, *data, "--epochs", "2", "--out", str(run), "--resume",
                 str(run / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained with --optimizer adamw" in err and "(got sgd)" in err
    assert [r["epoch"] for r in _log(run) if r["event"] == "epoch"] == [1], "nothing was appended to the run"


def test_eval_reports_offline_and_online_protocols(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train", str(dataset / "train.txt"), "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--weights", str(run / "checkpoint.pth"), "--val", str(dataset / "val.txt"),
                 "--num-clips", "2", "--crops", "3", "--twice-sample", "--workers", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "offline (2 clips x 3 crops" in table and "online (step, last frame)" in table
    result = json.loads(out.read_text())
    assert result["protocol"]["views"] == 2 * 2 * 3
    for key in ("offline", "online", "online_avg"):
        assert result[key]["count"] == 3 and 0 <= result[key]["top1"] <= 1
        assert {"top5", "mean_class_acc", "confusion"} <= set(result[key])


def test_train_skips_unreadable_videos_and_counts_them(dataset, tmp_path):
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"\x00" * 100)
    ann = tmp_path / "train.txt"
    ann.write_text((dataset / "train.txt").read_text().replace("videos/", f"{dataset}/videos/")
                   + f"{broken} 0\n")
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train", str(ann), "--labels", str(dataset / "labels.txt"), "--epochs", "1",
                 "--batch-size", "10", "--out", str(run)]) == 0
    epoch, final = _log(run)[1], _log(run)[-1]
    assert epoch["skipped"] == 1 and epoch["clips"] == 9
    assert final["skipped"] == [str(broken)]


@pytest.mark.parametrize("case, match", [
    ("missing", "annotation list not found"),
    ("labels", "only 2 labels"),
    ("model", "unknown model"),
    ("resume", "not found"),
    ("scales", "crop scales must be fractions in (0, 1], got [1.0, 1.5]"),
])
def test_bad_input_is_one_line_and_exit_code_2(dataset, tmp_path, capsys, case, match):
    args = ["train", *TINY, "--train", str(dataset / "train.txt"), "--epochs", "1", "--out", str(tmp_path / "r")]
    if case == "missing":
        args[args.index("--train") + 1] = str(tmp_path / "nope.txt")
    elif case == "labels":
        (tmp_path / "two.txt").write_text("a\nb\n")
        args += ["--labels", str(tmp_path / "two.txt")]
    elif case == "model":
        args[args.index("--model") + 1] = "no_such_model"
    elif case == "scales":
        args += ["--scales", "1", "1.5"]
    else:
        args = ["train", "--train", str(dataset / "train.txt"), "--resume", str(tmp_path / "none.pth")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


@pytest.mark.parametrize("by", ["path", "catalog name"])
def test_train_weights_of_a_streamtsm_checkpoint_need_no_architecture_flags(dataset, tmp_path, by):
    from streamtsm.engine.factory import DEMO_WEIGHTS

    run = tmp_path / "tuned"
    weights = str(DEMO_WEIGHTS) if by == "path" else "streamtsm_demo"  # the catalog's entry for the packaged file
    # The demo checkpoint names its architecture (tsm_r18_online, width 16, 64 px, shift_div 2): no --model,
    # --width, --input-size or --model-arg; --reset-head swaps its nine-motion classifier for the data's three.
    assert main(["train", "--weights", weights, "--reset-head", "--train", str(dataset / "train.txt"),
                 "--epochs", "1", *COMMON, "--out", str(run)]) == 0
    demo, tuned = read_checkpoint(DEMO_WEIGHTS)["config"], load(run / "checkpoint.pth").cfg
    assert tuned.name == demo["name"] and tuned.arch == demo["arch"] and tuned.input_size == demo["input_size"]
    assert tuned.num_classes == 3 and tuned.labels == CLASSES


def test_train_weights_with_a_contradicting_model_is_one_clear_error(dataset, tmp_path, capsys):
    from streamtsm.engine.factory import DEMO_WEIGHTS

    assert main(["train", "--model", "tsm_mobilenetv2_online", "--weights", str(DEMO_WEIGHTS), "--reset-head",
                 "--train", str(dataset / "train.txt"), "--epochs", "1", *COMMON, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model tsm_mobilenetv2_online does not match" in err
    assert "which holds tsm_r18_online" in err


@pytest.mark.parametrize("which", ["train", "val"])
def test_train_list_with_no_readable_clip_is_exit_2_naming_the_list(dataset, tmp_path, capsys, which):
    broken = []
    for i, name in enumerate(CLASSES):
        path = tmp_path / f"broken{i}.avi"
        path.write_bytes(b"\x00" * 100)
        broken.append(f"{path} {i}")
    bad_list = tmp_path / f"{which}_broken.txt"
    bad_list.write_text("\n".join(broken) + "\n")
    lists = {"train": str(dataset / "train.txt"), "val": str(dataset / "val.txt"), which: str(bad_list)}
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train", lists["train"], "--val", lists["val"], "--labels",
                 str(dataset / "labels.txt"), "--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{which} list {bad_list}" in err and "none of its 3 clips can be read" in err
    assert not (run / "checkpoint.pth").exists() and not (run / "best.pth").exists()


def test_train_removes_stale_temporary_checkpoints_at_start(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pth.tmp", "best.pth.tmp"):
        (run / name).write_bytes(b"half a checkpoint")  # what a run killed inside torch.save leaves
    (run / "notes.tmp").write_text("not ours")
    data = ["--train", str(dataset / "train.txt"), "--labels", str(dataset / "labels.txt")]
    assert main(["train", *TINY, *data, "--epochs", "1", "--out", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["best.pth", "checkpoint.pth", "labels.txt", "log.jsonl",
                                                     "notes.tmp"]
    assert read_checkpoint(run / "checkpoint.pth")["config"]["name"] == "tsm_mobilenetv2_online"


@pytest.mark.parametrize("flag", ["--resume", "--weights"])
def test_train_temporary_checkpoint_is_never_taken_for_a_checkpoint(dataset, tmp_path, capsys, flag):
    tmp = tmp_path / "checkpoint.pth.tmp"
    tmp.write_bytes(b"half a checkpoint")
    args = ["train", "--train", str(dataset / "train.txt"), flag, str(tmp), "--out", str(tmp_path / "r"), *COMMON]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} {tmp} is a temporary file" in err


@pytest.mark.parametrize("flag", ["--resume", "--weights"])
def test_train_checkpoint_with_implausible_config_is_one_line_exit_2(dataset, tmp_path, capsys, flag):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train", str(dataset / "train.txt"), "--epochs", "1", "--out", str(run)]) == 0
    checkpoint = read_checkpoint(run / "checkpoint.pth")
    checkpoint["config"]["std"] = [0.2, 0.0, 0.2]
    torch.save(checkpoint, tmp_path / "bad.pth")
    args = ["train", "--train", str(dataset / "train.txt"), flag, str(tmp_path / "bad.pth"), "--epochs", "2",
            "--out", str(tmp_path / "again"), *COMMON]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "std = [0.2, 0.0, 0.2]" in err
