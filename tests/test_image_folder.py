"""ImageFolder inputs (one subfolder per class): file order, labels from folder names or a class map, every
bad input as exit code 2, and labels that match shared/real's own label file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vit2trt.cli import app
from vit2trt.converter.measure.calibration import image_files
from vit2trt.converter.measure.validate import image_labels
from vit2trt.errors import Vit2TrtError

runner = CliRunner()
SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"

# class folder -> images below it, some nested deeper (relative paths inside the class folder)
LAYOUT = {
    "cat": ["b.png", "a/x.png", "a/deeper/y.jpg"],
    "ant": ["2.png", "1.png"],
    "bee": ["z/only.png"],
}


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (20 + seed, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_image_folder(root: Path, layout: dict = LAYOUT) -> Path:
    for seed, (name, files) in enumerate((n, f) for n, fs in layout.items() for f in fs):
        _image(root / name / files, seed)
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    root = make_image_folder(tmp_path / "data")
    (root / ".ipynb_checkpoints").mkdir()            # tool litter: neither a class nor images
    _image(root / ".ipynb_checkpoints" / "stale.png", 99)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def _labels(root: Path, class_map=None, width=10, labels=None) -> tuple[list[str], list[int]]:
    files = image_files(root, flag="--images")
    truth = image_labels(root, files, len(files), labels, class_map, width, "--images")
    return [f.relative_to(root).as_posix() for f in files], (None if truth is None else truth.tolist())


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_files_sorted_by_relative_path_and_labelled_by_sorted_folder_names(folder):
    files, labels = _labels(folder)
    assert files == ["ant/1.png", "ant/2.png", "bee/z/only.png", "cat/a/deeper/y.jpg", "cat/a/x.png", "cat/b.png"]
    assert labels == [0, 0, 1, 2, 2, 2]       # ant, bee, cat in sorted order
    # A limit samples every class round-robin (first of each, then second of each), in the same order.
    assert [f.name for f in image_files(folder, limit=3)] == ["1.png", "only.png", "y.jpg"]
    assert [f.name for f in image_files(folder, limit=5)] == ["1.png", "2.png", "only.png", "y.jpg", "x.png"]


def test_class_map_as_list_and_as_object(folder, tmp_path):
    as_list = _json(tmp_path / "list.json", ["cat", "unused_class", "ant", "bee"])   # a head's whole list
    assert _labels(folder, as_list)[1] == [2, 2, 3, 0, 0, 0]
    as_object = _json(tmp_path / "object.json", {"bee": 7, "ant": 4, "cat": 0})
    assert _labels(folder, as_object)[1] == [4, 4, 7, 0, 0, 0]


def test_a_flat_folder_keeps_its_labels_file(tmp_path):
    flat = tmp_path / "flat"
    for i in range(3):
        _image(flat / f"img{i}.png", i)
    (flat / "ignored_subfolder").mkdir()       # images at the top level: still a flat folder
    _image(flat / "ignored_subfolder" / "deep.png", 5)
    labels = _json(tmp_path / "labels.json", {"img0.png": 3, "img1.png": 1, "img2.png": 4})
    assert _labels(flat, labels=labels) == (["img0.png", "img1.png", "img2.png"], [3, 1, 4])
    assert _labels(flat) == (["img0.png", "img1.png", "img2.png"], None)


BAD_MAPS = [
    ("{broken", "not valid JSON"),
    ('"cat"', "expected a JSON list of folder names"),
    ("3", "expected a JSON list"),
    ('["cat", 1, "bee"]', "folder names (strings) only"),
    ('["cat", "ant", "cat", "bee"]', "'cat' appears more than once"),
    ('{"cat": 0, "ant": 1, "cat": 2, "bee": 3}', "'cat' appears more than once"),
    ('["cat", "ant"]', "no index for 1 class folder(s): 'bee'"),
    ('{"cat": 0, "ant": 1}', "no index for 1 class folder(s): 'bee'"),
    ('{"cat": 0, "ant": 1, "bee": 2, "dog": 3}', "names 1 folder(s) the images lack: 'dog'"),
    ('{"cat": 0, "ant": 1, "bee": 1}', "index 1 is given to 2 folders ('ant', 'bee')"),
    ('{"cat": 0, "ant": -1, "bee": 2}', "folder 'ant' has index -1"),
    ('{"cat": 0, "ant": 1.5, "bee": 2}', "folder 'ant' has index 1.5"),
    ('{"cat": 0, "ant": true, "bee": 2}', "folder 'ant' has index true"),
    ('{"cat": 0, "ant": 1, "bee": 10}', "'bee' is class 10, beyond the model's 10 outputs (0..9)"),
    ('["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "cat", "ant", "bee"]', "beyond the model's 10 outputs"),
]


@pytest.mark.parametrize("text,needle", BAD_MAPS)
def test_bad_class_maps_name_the_problem(folder, tmp_path, text, needle):
    (tmp_path / "map.json").write_text(text)
    with pytest.raises(Vit2TrtError, match="--class-map") as error:
        _labels(folder, tmp_path / "map.json")
    assert needle in str(error.value)


def test_bad_folders_name_the_problem(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "ant" / "deep").mkdir(parents=True)
    with pytest.raises(Vit2TrtError, match="no images in its subfolders"):
        image_files(empty, flag="--images")
    partly = make_image_folder(tmp_path / "partly")
    (partly / "dog" / "nested").mkdir(parents=True)
    with pytest.raises(Vit2TrtError, match="class folder 'dog' holds no images"):
        image_files(partly, flag="--images")
    with pytest.raises(Vit2TrtError, match="'cat' is class 2, beyond the model's 2 outputs .* give --class-map"):
        _labels(make_image_folder(tmp_path / "three"), width=2)


def test_labels_and_class_map_conflicts(folder, tmp_path):
    labels = _json(tmp_path / "labels.json", {"1.png": 0})
    with pytest.raises(Vit2TrtError, match="--labels .* conflicts with --images .* ImageFolder"):
        _labels(folder, labels=labels)
    flat = tmp_path / "flat"
    _image(flat / "img.png", 0)
    with pytest.raises(Vit2TrtError, match="--class-map .* needs an ImageFolder .* flat folder"):
        _labels(flat, _json(tmp_path / "map.json", ["a"]))
    with pytest.raises(Vit2TrtError, match="class 12 is beyond the model's 10 outputs"):
        _labels(flat, labels=_json(tmp_path / "big.json", {"img.png": 12}))
    with pytest.raises(Vit2TrtError, match="class -1 is negative"):
        _labels(flat, labels=_json(tmp_path / "negative.json", {"img.png": -1}))


def test_symlink_loops_are_walked_once(folder):
    (folder / "cat" / "a" / "loop").symlink_to(folder / "cat", target_is_directory=True)
    files, _ = _labels(folder)
    assert files.count("cat/b.png") == 1 and len(files) == 6


# --- through the CLI (exit code 2, one message, nothing written) -------------------------------------------


@pytest.fixture
def out_dir(tmp_path, deit_tiny_ts) -> Path:
    """A folder validate reads as an OUT: the 2-block DeiT-Tiny (10 classes) and its reference record."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(deit_tiny_ts.onnx_path, out / "model.onnx")
    shutil.copyfile(deit_tiny_ts.record_path, out / "reference.json")
    return out


def _assert_exit_2(result, needle):
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and text.startswith("error:") and needle in text, text


def test_validate_measures_accuracy_on_an_image_folder_as_on_labelled_flat_images(folder, out_dir, tmp_path):
    as_object = _json(tmp_path / "object.json", {"bee": 7, "ant": 4, "cat": 0})
    result = runner.invoke(app, ["validate", str(out_dir), "--images", str(folder), "--class-map", str(as_object)])
    assert result.exit_code == 0, result.output
    by_folder = json.loads((out_dir / "report.json").read_text())["validation"]
    flat = tmp_path / "flat"
    flat.mkdir()
    names, labels = _labels(folder, as_object)
    for i, name in enumerate(names):                 # the same images in the same order, labelled by a file
        shutil.copyfile(folder / name, flat / f"{i:02d}{Path(name).suffix}")
    labels_file = _json(tmp_path / "labels.json", {f"{i:02d}{Path(n).suffix}": y for i, (n, y) in
                                                   enumerate(zip(names, labels))})
    result = runner.invoke(app, ["validate", str(out_dir), "--images", str(flat), "--labels", str(labels_file)])
    assert result.exit_code == 0, result.output
    by_file = json.loads((out_dir / "report.json").read_text())["validation"]
    assert by_folder["images"] == by_file["images"] == 6
    assert by_folder["accuracy"] == pytest.approx(by_file["accuracy"])


@pytest.mark.parametrize("case,needle", [
    ("labels", "conflicts with --images"),
    ("beyond", "'bee' is class 12, beyond the model's 10 outputs"),
    ("missing", "no index for 1 class folder(s): 'cat'"),
    ("empty_class", "class folder 'dog' holds no images"),
    ("flat_with_map", "needs an ImageFolder"),
])
def test_validate_refuses_bad_labelled_folders(folder, out_dir, tmp_path, case, needle):
    argv = ["validate", str(out_dir), "--images", str(folder)]
    if case == "labels":
        argv += ["--labels", str(_json(tmp_path / "labels.json", {"1.png": 0}))]
    elif case == "beyond":
        argv += ["--class-map", str(_json(tmp_path / "map.json", {"ant": 0, "bee": 12, "cat": 1}))]
    elif case == "missing":
        argv += ["--class-map", str(_json(tmp_path / "map.json", ["ant", "bee"]))]
    elif case == "empty_class":
        (folder / "dog").mkdir()
    else:
        flat = tmp_path / "flat"
        _image(flat / "img.png", 0)
        argv = ["validate", str(out_dir), "--images", str(flat), "--class-map", str(_json(tmp_path / "m.json", []))]
    _assert_exit_2(runner.invoke(app, argv), needle)
    assert not (out_dir / "report.json").exists()


def test_an_unreadable_image_is_named_under_the_flag_the_user_typed(folder, out_dir):
    """validate takes its images with --images: a corrupt file in the tree is reported under --images, never
    under convert's and plan's --calib."""
    broken = folder / "cat" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    result = runner.invoke(app, ["validate", str(out_dir), "--images", str(folder)])
    _assert_exit_2(result, f"--images: could not read image {broken}")
    assert "--calib" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (out_dir / "report.json").exists()


def test_plan_refuses_labels_with_an_image_folder_and_writes_nothing(folder, deit_tiny_ts, tmp_path):
    labels = _json(tmp_path / "labels.json", {"1.png": 0})
    for extra, needle in (["--labels", str(labels)], "conflicts with --calib"), \
                         (["--class-map", str(_json(tmp_path / "m.json", {"ant": 0}))], "'bee'"):
        result = runner.invoke(app, ["plan", str(deit_tiny_ts.onnx_path), "--calib", str(folder), "--max-drop",
                                     "0.01", "--no-build", "--out", str(tmp_path / "plan"), *extra])
        _assert_exit_2(result, needle)
        assert not (tmp_path / "plan").exists()


def test_convert_calibrates_on_the_images_of_an_image_folder_alone(deit_tiny_ts, tmp_path):
    """12 class folders for a 10-class head: convert uses only the images, so their classes do not matter."""
    root = make_image_folder(tmp_path / "calib", {f"class{i:02d}": [f"sub/{i}.png"] for i in range(12)})
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(deit_tiny_ts.onnx_path), "--method", "tome", "--r", "4",
                                 "--calib", str(root), "--no-build", "--out", str(out)])
    assert result.exit_code == 0, result.output
    validation = json.loads((out / "report.json").read_text())["validation"]
    assert validation["images"] == 12 and "accuracy" not in validation


# --- real photos: labels from folder names and a class map agree with shared/real's own label file ------------


def _real_subset(tmp_path: Path, head_indices=(199, 100, 150), per_class: int = 4) -> tuple[Path, dict]:
    """A small ImageFolder of shared/real/val: one folder per class named by its synset, as people keep
    ImageNet; returns it and the label file's class of every copied image (by relative path)."""
    classes = json.loads((SHARED_REAL / "classes.json").read_text())
    wnid = {c["index"]: c["wnid"] for c in classes}
    table = [line.split() for line in (SHARED_REAL / "val.labels.txt").read_text().splitlines() if line.strip()]
    root, expected = tmp_path / "tin_val", {}
    for index in head_indices:
        names = sorted(name for name, label in table if int(label) == index)[:per_class]
        for k, name in enumerate(names):
            target = root / wnid[index] / ("nested" if k % 2 else ".") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SHARED_REAL / "val" / name, target)
            expected[target.relative_to(root).as_posix()] = index
    return root, expected


@pytest.mark.skipif(not (SHARED_REAL / "classes.json").is_file() or not (SHARED_REAL / "val").is_dir(),
                    reason="../shared/real (labelled Tiny-ImageNet photos) is not present (fresh clone)")
def test_real_photos_labels_match_the_label_file(tmp_path):
    root, expected = _real_subset(tmp_path)
    classes = json.loads((SHARED_REAL / "classes.json").read_text())
    whole_list = _json(tmp_path / "classes_list.json", [c["wnid"] for c in classes])     # the head's order
    present = {p.name for p in root.iterdir()}
    as_object = _json(tmp_path / "classes_object.json", {c["wnid"]: c["index"] for c in classes
                                                         if c["wnid"] in present})
    for class_map in (whole_list, as_object):
        files, labels = _labels(root, class_map, width=len(classes))
        assert len(files) == 12 and dict(zip(files, labels)) == expected
    _, sorted_labels = _labels(root, width=len(classes))
    assert sorted(set(sorted_labels)) == [0, 1, 2]   # without the map: sorted synsets, not the head's order


@pytest.mark.skipif(not (SHARED_REAL / "vit_tiny_tin200.safetensors").is_file(),
                    reason="../shared/real (the real pretrained ViT-Ti) is not present (fresh clone)")
def test_validate_the_real_model_on_a_real_image_folder(tmp_path):
    """The head's own class list as the class map: the real ViT-Ti scores well above chance (1/200); the
    folders' sorted order would label nearly every photo wrong."""
    from vit2trt.converter.deploy.export import export_model

    exported = export_model("timm:vit_tiny_patch16_224", tmp_path / "vit.onnx",
                            weights=str(SHARED_REAL / "vit_tiny_tin200.safetensors"), model_args={"num_classes": 200})
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(exported.onnx_path, out / "model.onnx")
    shutil.copyfile(exported.record_path, out / "reference.json")
    root, _ = _real_subset(tmp_path)
    classes = json.loads((SHARED_REAL / "classes.json").read_text())
    class_map = _json(tmp_path / "classes_list.json", [c["wnid"] for c in classes])
    result = runner.invoke(app, ["validate", str(out), "--images", str(root), "--class-map", str(class_map)])
    assert result.exit_code == 0, result.output
    v = json.loads((out / "report.json").read_text())["validation"]
    assert v["images"] == 12 and v["top1_agreement"] == 1.0
    assert v["accuracy"]["reference_top1"] >= 0.4 and v["accuracy"]["reference_top5"] >= 0.6, v["accuracy"]
