"""COCO box and mask AP of torchvision detector outputs, computed by pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(output: dict[str, Tensor], image_id: int, category_of: dict[int, int]) -> tuple[list, list]:
    """One image's detections as COCO result dicts ``(boxes, masks)``.

    ``output``: ``boxes [N, 4]`` xyxy in original pixels, ``scores [N]``, contiguous ``labels [N]``, and
    for Mask R-CNN ``masks [N, 1, H, W]`` probabilities (binarised at 0.5, run-length encoded).
    """
    boxes = output["boxes"].detach().float().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    cats = [category_of[int(label)] for label in output["labels"].cpu()]
    common = [{"image_id": image_id, "category_id": c, "score": s} for c, s in zip(cats, scores)]
    bbox = [{**d, "bbox": [x1, y1, x2 - x1, y2 - y1]} for d, (x1, y1, x2, y2) in zip(common, boxes)]
    segm = []
    if "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for d, m in zip(common, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")  # json-able, as COCO's own result files
            segm.append({**d, "segmentation": rle})
    return bbox, segm


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device,
            category_of: dict[int, int]) -> tuple[list, list, list[int]]:
    """Run ``model`` in eval mode over ``loader``'s ``(images, targets, ...)`` batches: COCO box results,
    mask results, image ids seen."""
    model.eval()
    bbox, segm, ids = [], [], []
    for images, targets, *_ in loader:
        if not images:
            continue
        outputs = model([image.to(device, non_blocking=True) for image in images])
        for output, target in zip(outputs, targets):
            b, s = coco_results(output, target["image_id"], category_of)
            bbox += b
            segm += s
            ids.append(target["image_id"])
    return bbox, segm, ids


def evaluate(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> tuple[dict[str, float], str]:
    """COCOeval over ``image_ids``: ``({AP, AP50, AP75, APs, APm, APl}, its 12-line summary)``, APs in [0, 1].

    With no detections at all every AP is 0 (pycocotools cannot load an empty result list).
    """
    if not results:
        return {m: 0.0 for m in METRICS}, f"no {iou_type} detections: every AP is 0\n"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        detections = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, detections, iou_type)
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = "".join(line for line in text.getvalue().splitlines(keepends=True) if "Average" in line)
    return {m: float(v) for m, v in zip(METRICS, ev.stats)}, summary
