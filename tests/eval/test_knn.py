"""Weighted kNN: hand-computed scores, a brute-force reference, feature extraction and the distributed merge."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from tests.conftest import write_folder
from tests.helpers import TINY, hide_gpus, run_script
from w2ssl.data.datasets import BadImages
from w2ssl.errors import UserError
from w2ssl.eval.knn import (
    KnnResult,
    extract_features,
    folder_loaders,
    format_knn,
    knn_accuracy,
    knn_eval,
    knn_predict,
    pooled_features,
)
from w2ssl.trunks import build_trunk
from w2ssl.trunks.vit import VIT


def brute_force_scores(train, train_labels, test, num_classes, k, temperature):
    """Double loop: for each test row, sort all training rows by similarity and vote with the top k."""
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i in range(len(test)):
        sims = [(float(test[i] @ train[j]), int(train_labels[j])) for j in range(len(train))]
        sims.sort(key=lambda s: -s[0])
        for sim, label in sims[:k]:
            scores[i, label] += math.exp(sim / temperature)
    return scores


def unit(n, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)


def test_hand_computed_scores():
    e1, e2 = torch.eye(2, dtype=torch.float64)
    train = torch.stack([e1, e2, (e1 + e2) / math.sqrt(2)])
    labels = torch.tensor([0, 1, 1])
    # Nearest two to e1: itself (sim 1, label 0) and the diagonal (sim 1/sqrt2, label 1); e2 (sim 0) is out.
    scores = knn_predict(train, labels, e1[None], num_classes=3, k=2, temperature=0.5)
    expected = torch.tensor([[math.exp(2.0), math.exp(math.sqrt(2)), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_knn_predict_matches_brute_force_across_chunks(k):
    train, test = unit(40, 8, 0), unit(11, 8, 1)
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(2))
    reference = brute_force_scores(train, labels, test, 5, k, 0.07)
    scores = knn_predict(train, labels, test, 5, k=k, temperature=0.07, chunk=3)
    torch.testing.assert_close(scores, reference, rtol=1e-9, atol=0.0)


def test_knn_predict_clips_k_to_bank():
    train, test = unit(6, 4, 3), unit(5, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(knn_predict(train, labels, test, 3, k=200), knn_predict(train, labels, test, 3, k=6))


def test_knn_accuracy_matches_reference_top1_top5():
    train, test = unit(60, 8, 5), unit(23, 8, 6)
    g = torch.Generator().manual_seed(7)
    train_labels, test_labels = torch.randint(0, 7, (60,), generator=g), torch.randint(0, 7, (23,), generator=g)
    result = knn_accuracy(train, train_labels, test, test_labels, 7, ks=(3, 20, 200), chunk=4)
    for k in (3, 20, 200):
        scores = brute_force_scores(train, train_labels, test, 7, min(k, 60), 0.07)
        true = scores.gather(1, test_labels[:, None])
        rank = (scores > true).sum(dim=1)  # classes scoring above the true one
        top1 = 100.0 * (rank == 0).double().mean().item()
        top5 = 100.0 * ((rank < 5) & (true[:, 0] > 0)).double().mean().item()
        assert result[k] == pytest.approx((top1, top5))
    assert result[20] != result[3]  # random data: different k must not collapse to the same neighbours


def test_knn_accuracy_is_100_on_separable_clusters():
    g = torch.Generator().manual_seed(8)
    centres = torch.eye(4, 16)
    train_labels, test_labels = torch.arange(4).repeat(60), torch.arange(4).repeat(10)
    train = F.normalize(centres[train_labels] + 0.1 * torch.randn(240, 16, generator=g), dim=1)
    test = F.normalize(centres[test_labels] + 0.1 * torch.randn(40, 16, generator=g), dim=1)
    # 4 classes: top-5 would always be 100 %, so it is not reported.
    assert knn_accuracy(train, train_labels, test, test_labels, 4) == {20: (100.0, None), 200: (100.0, None)}
    # Swapping the test labels must give 0 top-1, proving the labels are actually compared.
    assert knn_accuracy(train, train_labels, test, (test_labels + 1) % 4, 4, ks=(20,))[20][0] == 0.0


def test_knn_rejects_bad_inputs():
    train, test = unit(4, 3, 9), unit(2, 3, 10)
    with pytest.raises(ValueError, match="one label per row"):
        knn_predict(train, torch.tensor([0, 1]), test, 2)
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn_predict(train, torch.zeros(4, dtype=torch.long), unit(2, 5, 11), 2)
    with pytest.raises(ValueError, match="ks must be positive"):
        knn_accuracy(train, torch.zeros(4, dtype=torch.long), test, torch.zeros(2, dtype=torch.long), 2, ks=())


def test_format_knn():
    assert format_knn(KnnResult({200: (1.0, 2.0), 20: (3.456, 4.0)}, bank=5000, queries=100)) == \
        "kNN k=20 acc1 3.46 acc5 4.00 | k=200 acc1 1.00 acc5 2.00 (5000 train, 100 val images)"
    # k above the bank is clamped and says so; no top-5 below 5 classes; unreadable images are counted.
    assert format_knn(KnnResult({20: (50.0, None), 200: (40.0, None)}, bank=24, queries=12, unreadable=2)) == \
        ("kNN k=20 acc1 50.00 | k=200 (clamped to the 24 training images) acc1 40.00 "
         "(24 train, 12 val images; 2 unreadable skipped)")


def test_folder_loaders_skip_unreadable_images_and_check_classes(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train", classes=3, per_class=3, size=(20, 20))
    write_folder(root / "val", classes=3, per_class=2, size=(20, 20), seed=1)
    (root / "val" / "class1" / "0.jpg").write_bytes(b"not a jpeg")
    said = []
    train, val, classes = folder_loaders(root, 16, 4, 0, BadImages(warn=said.append))
    result = knn_eval(resnet18(), train, val, "cpu", classes)
    assert (result.bank, result.queries, result.unreadable) == (9, 5, 1)
    assert result.accuracy[20][1] is None  # 3 classes: no top-5
    knn_eval(resnet18(), train, val, "cpu", classes)
    assert said == [f"unreadable image file {root / 'val' / 'class1' / '0.jpg'} skipped (1 so far)"]  # warned once
    with pytest.raises(UserError, match="unreadable image file .*0.jpg: remove or replace it"):
        knn_eval(resnet18(), *folder_loaders(root, 16, 4, 0, BadImages(strict=True))[:2], "cpu", classes)
    (root / "val" / "class2").rename(root / "val" / "other")
    with pytest.raises(UserError, match=r"same class sub-folders: only in train 'class2' \(3 classes\), only in "
                                        r"val 'other' \(3 classes\)"):
        folder_loaders(root, 16, 4, 0)


def tiny_data(n=10, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 3)


def resnet18(seed=0):
    torch.manual_seed(seed)
    return build_trunk("resnet18")


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return build_trunk("vit_small", embed_dim=32, depth=1, num_heads=2).eval()


def test_extract_features_shapes_norms_and_modes():
    model = resnet18()
    model.train()
    model.layer1.eval()  # a mixed state (e.g. a frozen block) must come back as it was
    data = tiny_data()
    feats, labels = extract_features(model, DataLoader(data, batch_size=4), "cpu")
    assert feats.shape == (10, 512) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert torch.equal(labels, data.tensors[1])
    assert model.training and model.layer2.training and not model.layer1.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, F.normalize(model(data.tensors[0]).mean(dim=(2, 3)), dim=1))


def test_extract_features_image_folder(image_root):
    tf = torchvision.transforms.Compose([torchvision.transforms.Resize((32, 32)), torchvision.transforms.ToTensor()])
    data = torchvision.datasets.ImageFolder(str(image_root / "val"), transform=tf)
    feats, labels = extract_features(resnet18(), DataLoader(data, batch_size=5), "cpu")
    assert feats.shape == (12, 512)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(12))
    assert labels.tolist() == data.targets


def test_pooled_features_of_a_resnet_trunk_are_torchvisions_pooled_features():
    trunk = resnet18().eval()
    model = torchvision.models.resnet18().eval()
    model.load_state_dict({**model.state_dict(), **trunk.state_dict()})
    model.fc = nn.Identity()
    x = tiny_data(n=2).tensors[0]
    with torch.no_grad():
        feats = pooled_features(trunk, x)
        torch.testing.assert_close(feats, model(x))
    assert feats.shape == (2, 512)


def test_pooled_features_of_a_vit_are_its_patch_token_average_or_class_token():
    trunk, x = tiny_vit(), tiny_data(n=2).tensors[0]
    with torch.no_grad():
        tokens = trunk.forward_tokens(x)  # [2, 1 + 2·2, 32]
        torch.testing.assert_close(pooled_features(trunk, x, VIT.readout()), tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(pooled_features(trunk, x), tokens[:, 1:].mean(dim=1))  # the map's mean: the same
        torch.testing.assert_close(pooled_features(trunk, x, VIT.readout("cls")), tokens[:, 0])
    feats, _ = extract_features(trunk, DataLoader(tiny_data(n=2), batch_size=1), "cpu", readout=VIT.readout("cls"))
    torch.testing.assert_close(feats, F.normalize(tokens[:, 0], dim=1))
    with pytest.raises(ValueError, match="vit trunks have no 'max' read-out; choose one of avg, cls"):
        VIT.readout("max")


def test_extract_features_autocast_and_channels_last():
    trunk = resnet18()
    loader = DataLoader(tiny_data(n=3), batch_size=2)
    ref, _ = extract_features(trunk, loader, "cpu")
    feats, _ = extract_features(trunk, loader, "cpu", channels_last=True, autocast_dtype=torch.bfloat16)
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(feats, ref, atol=0.05, rtol=0)
    assert trunk.training


def _distributed_worker(rank, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        data, model = tiny_data(n=7), resnet18()
        for drop_last in (False, True):
            sampler = DistributedSampler(data, world, rank, shuffle=True, seed=3, drop_last=drop_last)
            feats, labels = extract_features(model, DataLoader(data, batch_size=2, sampler=sampler), "cpu")
            torch.save((feats, labels), f"{tmp}/rank{rank}_{drop_last}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_extract_features_merges_distributed_shards(tmp_path, monkeypatch):
    hide_gpus(monkeypatch)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    data = tiny_data(n=7)
    expected, labels = extract_features(resnet18(), DataLoader(data, batch_size=7), "cpu")
    for drop_last in (False, True):
        # 7 images on 2 ranks: padding repeats one index (dropped); drop_last leaves one image out.
        kept = sorted({i for r in range(2) for i in DistributedSampler(data, 2, r, shuffle=True, seed=3,
                                                                       drop_last=drop_last)})
        assert len(kept) == (6 if drop_last else 7)
        for rank in range(2):
            feats, got_labels = torch.load(tmp_path / f"rank{rank}_{drop_last}.pt")
            torch.testing.assert_close(feats, expected[kept], atol=1e-5, rtol=0)
            assert torch.equal(got_labels, labels[kept])


def _labelled_worker(rank, world, tmp, root):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/labelled_store", rank=rank, world_size=world)
    try:
        _, val, _ = folder_loaders(root, 16, 2, 0, BadImages(warn=lambda _: None))
        torch.save(extract_features(resnet18(), val, "cpu"), f"{tmp}/labelled{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_extract_features_merges_labelled_shards_without_unreadable_images(tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train", classes=3, per_class=2, size=(20, 20))
    write_folder(root / "val", classes=3, per_class=3, size=(20, 20), seed=1)
    (root / "val" / "class1" / "0.jpg").write_bytes(b"")
    mp.start_processes(_labelled_worker, args=(2, str(tmp_path), str(root)), nprocs=2, start_method="spawn")
    _, val, _ = folder_loaders(root, 16, 2, 0, BadImages(warn=lambda _: None))
    expected, labels = extract_features(resnet18(), val, "cpu")
    assert len(expected) == 8 and labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    for rank in range(2):  # 9 images on 2 unpadded shards, one unreadable: every process has the 8 others in order
        feats, got_labels = torch.load(tmp_path / f"labelled{rank}.pt")
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
        assert torch.equal(got_labels, labels)


@pytest.mark.slow
def test_pretraining_knn_every_skips_an_unreadable_image(image_root, tmp_path):
    knn = tmp_path / "knn"
    write_folder(knn / "train", classes=3, per_class=2, size=(20, 20))
    write_folder(knn / "val", classes=3, per_class=2, size=(20, 20), seed=1)
    (knn / "val" / "class1" / "0.jpg").write_bytes(b"junk")
    common = [image_root, *TINY, "-b", "8", "--epochs", "1", "--workers", "0", "--knn-every", "1", "--knn-data", knn,
              "--knn-size", "16"]
    res = run_script("main_moco.py", *common, "--save-dir", tmp_path / "out", timeout=300)
    assert res.returncode == 0, res.stderr
    assert "k=200 (clamped to the 6 training images) acc1" in res.stdout
    assert "(6 train, 5 val images; 1 unreadable skipped)" in res.stdout
    strict = run_script("main_moco.py", *common, "--strict-data", "--save-dir", tmp_path / "strict", timeout=300)
    assert strict.returncode == 2 and strict.stderr.startswith("error: unreadable image file "), strict.stderr
