"""The probe's running loss and top-k sums, against hand counts."""
import torch

from w2ssl.eval.metrics import Tally, coverage


def test_tally_sums_batches_and_keeps_the_last():
    tally = Tally(torch.device("cpu"))
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    tally.add(torch.tensor(3.0), logits, torch.tensor([1, 2]))  # row 0 top-1; row 1 top-3 only
    tally.add(torch.tensor(1.0), logits[:1], torch.tensor([0]))  # top-3 only
    assert tally.last.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert tally.total.tolist() == [4.0, 1.0, 3.0, 3.0]
    assert tally.text() == "Loss 1.0000e+00 (1.3333e+00)\tAcc@1   0.00 ( 33.33)\tAcc@5 100.00 (100.00)"


def test_coverage():
    assert coverage(100, 100) == "100 val images"
    assert coverage(98, 100) == "98 of 100 val images (2 unreadable skipped)"
