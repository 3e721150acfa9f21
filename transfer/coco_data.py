"""COCO-format detection data for torchvision's detectors: dataset, collate and loaders.

Category ids of the json map to contiguous labels ``1..K`` in sorted id order (0 is background);
``category_of`` maps back for evaluation. Crowd boxes and boxes without area are not targets.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from torchvision.transforms.functional import pil_to_tensor

from w2ssl.errors import UserError


def read_coco(ann_file: str | Path) -> COCO:
    """pycocotools' index of ``ann_file``, with its progress prints kept quiet."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"annotation file {ann_file} does not exist: pass a COCO-format instances json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"{ann_file} is not a COCO-format instances json ({type(e).__name__}: {e})") from e
    if not coco.getCatIds():
        raise UserError(f"{ann_file} lists no categories: a detection json needs a 'categories' list")
    return coco


def xyxy_box(ann: dict, width: int, height: int) -> list[float] | None:
    """COCO ``[x, y, w, h]`` clipped to the image as ``[x1, y1, x2, y2]``; ``None`` if empty or crowd."""
    if ann.get("iscrowd", 0):
        return None
    x, y, w, h = ann["bbox"]
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, width), min(y + h, height)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


class CocoDetection(Dataset):
    """Images of a COCO json as ``(image [3, H, W] float in [0, 1], target dict, unreadable paths)``.

    ``target``: ``boxes [N, 4]`` float xyxy, ``labels [N]`` int64, ``image_id`` int, and with ``masks``
    ``masks [N, H, W]`` uint8. ``train`` drops images without a usable box and flips half the images
    horizontally. An unreadable image file is listed in the third field: for training it is replaced
    by the next readable image (batches keep their size), for evaluation the image is None and
    :func:`collate` drops it.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, *, train: bool, masks: bool = False):
        self.coco = read_coco(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise UserError(f"image folder {self.image_dir} does not exist: pass the folder of the json's file_names")
        cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.category_of = {i: c for c, i in self.label_of.items()}
        self.train, self.masks = train, masks
        ids = sorted(self.coco.getImgIds())
        self.ids = [i for i in ids if self.annotations(i)] if train else ids
        if not self.ids:
            usable = "image with a non-crowd box of positive area" if train else "images"
            raise UserError(f"{ann_file} has no {usable}: pass a json with annotated images")
        if masks and any("segmentation" not in a for i in self.ids for a in self.coco.imgToAnns[i]):
            raise UserError(f"{ann_file} has annotations without 'segmentation': train Mask R-CNN on instance masks")
        missing = [self.path(i) for i in self.ids if not self.path(i).is_file()]
        if missing:
            raise UserError(f"{len(missing)} images of {ann_file} are missing, e.g. {missing[0]}: check the folder")

    @property
    def num_classes(self) -> int:
        """Foreground categories plus background."""
        return len(self.label_of) + 1

    def path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def annotations(self, image_id: int) -> list[tuple[dict, list[float]]]:
        """Usable annotations of one image with their clipped xyxy boxes."""
        info = self.coco.imgs[image_id]
        pairs = [(a, xyxy_box(a, info["width"], info["height"])) for a in self.coco.imgToAnns[image_id]]
        return [(a, box) for a, box in pairs if box is not None and a["category_id"] in self.label_of]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor | None, dict[str, Tensor], list[str]]:
        bad = []
        for offset in range(len(self.ids) if self.train else 1):
            image_id = self.ids[(index + offset) % len(self.ids)]
            try:
                with Image.open(self.path(image_id)) as img:
                    image = pil_to_tensor(img.convert("RGB")).float().div_(255)
                break
            except (OSError, ValueError, SyntaxError):
                bad.append(str(self.path(image_id)))
        else:
            return None, {"image_id": self.ids[index]}, bad
        info = self.coco.imgs[image_id]
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise UserError(f"{self.path(image_id)} is {image.shape[2]}x{image.shape[1]} px but the json says "
                            f"{info['width']}x{info['height']}: fix the json or the image")
        anns = self.annotations(image_id)
        target = {
            "boxes": torch.tensor([box for _, box in anns], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a, _ in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a, _ in anns]) if anns else \
                np.zeros((0, info["height"], info["width"]), np.uint8)
            target["masks"] = torch.from_numpy(masks)
        if self.train and torch.rand(()) < 0.5:
            image, target = hflip(image, target)
        return image, target, bad


def hflip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror ``image [3, H, W]`` and its boxes (``x -> W - x``) and masks left to right."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate(batch: list[tuple[Tensor | None, dict, list[str]]]) -> tuple[list[Tensor], list[dict], list[str]]:
    """Lists of the readable images and their targets (the detectors take images of different sizes), and
    the unreadable files met."""
    kept = [b for b in batch if b[0] is not None]
    return [b[0] for b in kept], [b[1] for b in kept], [path for b in batch for path in b[2]]


def train_loader(dataset: CocoDetection, batch_size: int, workers: int, distributed: bool,
                 seed: int = 0) -> DataLoader:
    """Shuffled batches, the last incomplete one dropped; one shard per process when ``distributed``."""
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True) if distributed \
        else RandomSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=True, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def eval_loader(dataset: CocoDetection, batch_size: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    """Every ``world``-th image from ``rank``, each exactly once over all processes (no padding)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), world),
                      num_workers=workers, collate_fn=collate)
