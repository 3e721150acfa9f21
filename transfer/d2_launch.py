"""What the detectron2 configs in ``transfer/configs`` need beyond stock detectron2, and the launch.

Imported only by ``transfer.train_net`` once detectron2 is known to import. Registers
``Res5ROIHeadsExtraNorm`` (the C4 box head with a norm after res5, as in the MoCo protocol: res5 runs
in the ROI head, so its output would otherwise reach the box predictor un-normalised), and picks the
COCO or VOC evaluator from the dataset name.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` with ``MODEL.RESNETS.NORM`` appended to the res5 stage."""

    def __init__(self, cfg: CfgNode, input_shape) -> None:
        super().__init__(cfg, input_shape)
        self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


class Trainer(DefaultTrainer):
    """detectron2's default trainer with an evaluator chosen by dataset name."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
        if "voc" in dataset_name:
            return PascalVOCDetectionEvaluator(dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))


def setup(args) -> CfgNode:
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def check_weights(cfg: CfgNode, resume: bool) -> str | None:
    """A one-line problem with ``MODEL.WEIGHTS``, or ``None`` when it can be loaded."""
    weights = cfg.MODEL.WEIGHTS
    if resume and (Path(cfg.OUTPUT_DIR) / "last_checkpoint").is_file():
        return None
    if "://" in weights:
        return None
    if not weights or not Path(weights).is_file():
        return (f"MODEL.WEIGHTS {weights!r} is not a file: convert a checkpoint with "
                "python -m transfer.convert_pretrain_to_detectron2 and pass MODEL.WEIGHTS path/to/out.pkl")
    return None


def worker(args) -> dict:
    """One process: train (or only evaluate) as the config says; returns the evaluation results."""
    cfg = setup(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(argv: list[str] | None = None) -> int:
    args = default_argument_parser().parse_args(argv)
    problem = check_weights(setup(args), args.resume)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0
