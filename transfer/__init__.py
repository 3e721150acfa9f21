"""Transfer to detection: detectron2 weight conversion and launcher, torchvision fine-tuning (see README.md)."""
