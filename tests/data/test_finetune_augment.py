"""Fine-tuning's training transform: the probe's for the ResNet recipe, MAE's (timm) for the ViT recipe."""
import pytest
import torch
from PIL import Image
from torchvision import transforms

from w2ssl.data.finetune_augment import finetune_transform
from w2ssl.errors import UserError


def test_no_randaugment_and_no_erasing_is_the_probes_crop_and_flip():
    t = finetune_transform(32)
    assert [type(op) for op in t.transforms] == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip,
                                                 transforms.ToTensor, transforms.Normalize]


def test_maes_recipe_is_timms_randaugment_then_erasing_after_normalising():
    t = finetune_transform(32, "rand-m9-mstd0.5-inc1", 0.25)
    names = [type(op).__name__ for op in t.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in names
    assert names.index("Normalize") < names.index("RandomErasing")
    erase = t.transforms[names.index("RandomErasing")]
    assert (erase.probability, erase.mode, erase.max_count) == (0.25, "pixel", 1)
    ra = t.transforms[names.index("RandAugment")]
    assert ra.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    out = t(Image.new("RGB", (40, 30), (120, 60, 200)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_an_unknown_policy_is_one_line_naming_the_flag():
    with pytest.raises(UserError, match="--aa foo is not a timm augmentation policy"):
        finetune_transform(32, "foo", 0.0)
