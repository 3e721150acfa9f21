"""Evaluation of a pre-trained trunk: kNN and the linear probe."""
