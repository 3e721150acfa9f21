import pytest
import torch
from PIL import Image

from w2ssl.data.augment import FourCrop
from w2ssl.data.datasets import (
    BadImages,
    LabelledFolder,
    PretrainDataset,
    collate_readable,
    image_folder,
    labelled_loader,
    sample_seed,
    stream_seed,
)
from w2ssl.data.sampler import ResumableSampler, make_loader
from w2ssl.errors import UserError


def test_sample_seed_mixes_all_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(-3, 3)}
    assert len(seeds) == 54 and all(0 <= s < 2**63 for s in seeds)


def test_stream_seeds_differ_by_name_and_from_the_sample_seeds():
    names = ("tile_perm", "other")
    seeds = {stream_seed(0, name, e, i) for name in names for e in range(3) for i in range(4)}
    assert len(seeds) == 2 * 3 * 4
    assert not seeds & {sample_seed(0, e, i) for e in range(3) for i in range(4)}
    assert stream_seed(0, "tile_perm", 1, 2) == stream_seed(0, "tile_perm", 1, 2) < 2**63


def test_augmentation_depends_only_on_seed_epoch_and_index(image_root):
    ds = PretrainDataset(image_root / "train", FourCrop(16), seed=7)
    a, _ = ds[(3, 1)]
    torch.manual_seed(123)  # the global RNG state does not matter
    b, _ = ds[(3, 1)]
    c, _ = ds[(3, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_loader_batches_are_the_same_for_any_worker_count(image_root):
    ds = PretrainDataset(image_root / "train", FourCrop(16), seed=0)
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds), 4, seed=0)
        sampler.set_epoch(1, start_batch=2)
        loader = make_loader(ds, sampler, workers, pin_memory=False)
        batches.append([tiles for tiles, _ in loader])
    assert len(batches[0]) == 4
    for x, y in zip(*batches):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_bad_files_are_replaced_and_reported(tmp_path):
    d = tmp_path / "train" / "c"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(d / "a.jpg")
    (d / "b.jpg").write_bytes(b"")
    Image.new("RGB", (40, 30), "blue").save(d / "c.jpg")
    ds = PretrainDataset(tmp_path / "train", lambda img: img.getpixel((0, 0)), seed=0)
    value, bad = ds[(1, 0)]
    assert bad == str(d / "b.jpg") and value[2] > 200       # replaced by the next file (blue)
    assert ds[(0, 0)][1] == ""
    ds.check_readable()


def test_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "c").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images in its 1 class sub-folders"):
        image_folder(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="has no class sub-folders"):
        image_folder(tmp_path / "flat")
    d = tmp_path / "junk" / "c"
    d.mkdir(parents=True)
    (d / "x.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the 1 image files"):
        PretrainDataset(tmp_path / "junk", None, seed=0).check_readable()


def test_empty_class_folder_is_a_warning_not_an_error(tmp_path, capsys):
    for name in ("a", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(tmp_path / "train" / name / "x.jpg")
    (tmp_path / "train" / "b").mkdir()
    said = []
    folder = image_folder(tmp_path / "train", warn=said.append)
    assert len(folder.samples) == 2 and folder.classes == ["a", "b", "c"]  # labels keep their indices
    assert said == [f"training folder {tmp_path / 'train'}: class folder(s) 'b' hold no images; going on with the "
                    f"2 images of the other 2"]
    assert len(PretrainDataset(tmp_path / "train", None, seed=0)) == 2  # pre-training needs no labels
    assert "WARNING: training folder" in capsys.readouterr().err


def _bad_folder(tmp_path):
    d = tmp_path / "val"
    for name, colour in (("a", "red"), ("b", "blue")):
        (d / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(d / name / "0.png")
        Image.new("RGB", (8, 8), colour).save(d / name / "2.png")
    (d / "a" / "1.png").write_bytes(b"junk")
    return d


def test_labelled_folder_drops_or_replaces_unreadable_images(tmp_path):
    d = _bad_folder(tmp_path)
    colour = lambda img: img.getpixel((0, 0))  # noqa: E731
    dropped = LabelledFolder(d, colour, "validation", substitute=False)
    assert dropped[1] == (None, 0, 1, str(d / "a" / "1.png"))
    replaced = LabelledFolder(d, colour, "training", substitute=True)
    assert replaced[1] == ((255, 0, 0), 0, 1, str(d / "a" / "1.png"))  # the next readable image, with its label
    images, targets, indices, bad = collate_readable([(torch.zeros(1), 0, 0, ""), dropped[1],
                                                      (torch.ones(1), 1, 3, "")])
    assert images.tolist() == [[0.0], [1.0]] and targets.tolist() == [0, 1] and indices.tolist() == [0, 3]
    assert bad == [str(d / "a" / "1.png")]
    assert collate_readable([dropped[1]])[0] is None


def test_labelled_loader_counts_each_unreadable_file_once(tmp_path):
    d = _bad_folder(tmp_path)
    said = []
    bad = BadImages(warn=said.append)
    loader, classes = labelled_loader(d, lambda img: torch.zeros(3, 2, 2), 2, 0, False, "validation", bad=bad)
    for _ in range(2):
        batches = list(loader)
        assert [b[2].tolist() for b in batches] == [[0], [2, 3], [4]] and classes == 2
    assert said == [f"unreadable image file {d / 'a' / '1.png'} skipped (1 so far)"] and len(bad.paths) == 1
    strict, _ = labelled_loader(d, lambda img: torch.zeros(3, 2, 2), 2, 0, False, "validation",
                                bad=BadImages(strict=True))
    with pytest.raises(UserError, match=r"unreadable image file .*1.png: remove or replace it"):
        list(strict)
    train, _ = labelled_loader(d, lambda img: torch.zeros(3, 2, 2), 2, 0, False, "training", training=True)
    assert [len(b[1]) for b in train] == [2, 2, 1]  # training keeps its batch sizes
