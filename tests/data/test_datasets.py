import time

import pytest
import torch
from PIL import Image

from w2ssl.data.augment import FourCrop
from w2ssl.data.datasets import (
    BadImages,
    LabelledFolder,
    PretrainDataset,
    ResumableSampler,
    collate_readable,
    image_folder,
    labelled_loader,
    make_loader,
    sample_seed,
)
from w2ssl.errors import UserError


def test_sampler_resumes_mid_epoch_with_the_same_order():
    full = ResumableSampler(30, batch_size=4, seed=3)
    full.set_epoch(2)
    order = full.indices()
    assert len(order) == 28 and len(set(order)) == 28     # drop_last: 7 batches of 4
    part = ResumableSampler(30, batch_size=4, seed=3)
    part.set_epoch(2, start_batch=5)
    assert part.indices() == order[20:] and len(part) == 8
    assert list(part)[0] == (order[20], 2)
    other = ResumableSampler(30, batch_size=4, seed=3)
    other.set_epoch(3)
    assert other.indices() != order


def test_sampler_streams_epochs_one_after_another():
    s = ResumableSampler(30, batch_size=4, seed=3)
    s.set_epoch(2, start_batch=5, until=4)
    stream = list(s)                      # epochs 2 (from batch 5) and 3
    assert len(stream) == len(s) == 8 + 28
    assert stream[:8] == [(i, 2) for i in s.epoch_indices(2)[20:]]
    assert stream[8:] == [(i, 3) for i in s.epoch_indices(3)] and s.epoch_indices(3) != s.epoch_indices(2)


class SlowItems(torch.utils.data.Dataset):
    """``(index, epoch) -> index`` after ``delay`` seconds, like an image decode."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> int:
        time.sleep(self.delay)
        return key[0]


@pytest.mark.slow  # starts worker processes
def test_loader_prefetches_the_next_epoch_while_this_one_trains():
    sampler = ResumableSampler(8, batch_size=4, seed=0)
    sampler.set_epoch(0, until=2)
    batches = iter(make_loader(SlowItems(8, 0.1), sampler, workers=2, pin_memory=False))
    for _ in range(2):                    # epoch 0
        next(batches)
        time.sleep(1.0)                   # a training step, during which the workers fill their queue
    start = time.perf_counter()
    first = next(batches)                 # epoch 1's first batch: already made (a fresh start takes 0.4 s)
    assert time.perf_counter() - start < 0.2
    assert first.tolist() == sampler.epoch_indices(1)[:4]


def test_sampler_shards_are_slices_of_the_one_process_batches():
    """Rank r takes the r-th slice of each global batch: the global batch, in order, does not depend on
    the number of processes (10 images, global batch 6: one whole batch per epoch)."""
    single = ResumableSampler(10, batch_size=6, seed=0)
    shards = [ResumableSampler(10, batch_size=2, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for epoch in (0, 1):
        whole = single.epoch_indices(epoch)
        assert len(whole) == 6 and len(set(whole)) == 6
        assert [i for s in shards for i in s.epoch_indices(epoch)] == whole
    assert all(s.batches_per_epoch == 1 for s in shards)


def test_sample_seed_mixes_all_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(-3, 3)}
    assert len(seeds) == 54 and all(0 <= s < 2**63 for s in seeds)


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
