import torch

from w2ssl.engine.monitor import ETA, AverageMeter, EpochProgress, LoaderCheck, Logger, format_duration
from w2ssl.methods.w2ssl import console


def test_average_meter_prints_like_the_authors():
    m = AverageMeter("Loss", ":.4e")
    m.update(2.0)
    m.update(4.0, n=3)
    assert m.avg == 3.5
    assert str(m) == "Loss 4.0000e+00 (3.5000e+00)"


def test_durations_and_eta():
    assert format_duration(3725.9) == "1:02:05"
    assert format_duration(-5) == "0:00:00"
    eta = ETA(total_iters=100, done_iters=40)
    assert eta.step(40) == "?"
    eta.start -= 10.0                   # 10 s for 10 iterations -> 50 left = 50 s
    assert eta.step(50) == "0:00:50"


def test_logger_writes_log_txt_and_tensorboard(tmp_path):
    log = Logger(tmp_path, enabled=True)
    log.info("hello")
    log.warn("careful")
    log.scalars(3, {"loss": 1.5})
    log.close()
    assert (tmp_path / "log.txt").read_text() == "hello\nWARNING: careful\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    quiet = Logger(tmp_path / "other", enabled=False)
    quiet.info("nothing")
    quiet.close()
    assert not (tmp_path / "other").exists()


def test_epoch_progress_prints_current_and_average(tmp_path):
    log = Logger(tmp_path, enabled=True, tensorboard=False)
    progress = EpochProgress(log, torch.device("cpu"), batch_size=8, iters_per_epoch=12, epoch=3, fields=console)
    for i, loss in enumerate([3.0, 5.0]):
        parts = {"loss": torch.tensor(loss), "loss_where": torch.tensor(0.5), "loss_what": torch.tensor(loss - 0.5),
                 "where_acc": torch.tensor(0.25 * i)}
        progress.record(parts, {"lr": 0.1, "momentum": 0.99}, data_s=0.5, batch_s=2.0)
    progress.line(step=7, iteration=2, eta="0:01:00", extra={})
    log.close()
    line = (tmp_path / "log.txt").read_text().strip()
    assert line.startswith("Epoch: [3][ 2/12]\tTime  2.000 ( 2.000)\tData  0.500 ( 0.500)\tWait 25%\tLR 1.0000e-01\t")
    assert "Loss 5.0000e+00 (4.0000e+00)\tLoss_loc 5.0000e-01 (5.0000e-01)\tLoss_crop 4.5000e+00 (3.5000e+00)" in line
    assert line.endswith("Where_acc 25.0 (12.5)\timg/s 4.0\tETA 0:01:00")
    assert progress.pending == []


def test_logger_creates_nothing_until_something_is_logged(tmp_path):
    log = Logger(tmp_path / "run", enabled=True)
    log.flush()
    log.close()
    assert not (tmp_path / "run").exists()  # a run that failed its checks leaves no empty log.txt or tb/
    log = Logger(tmp_path / "run", enabled=True)
    log.scalars(0, {"loss": 1.0})
    log.close()
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*")) and not (tmp_path / "run" / "log.txt").exists()


class Recorder(Logger):
    """A logger that keeps the TensorBoard scalars it is given."""

    def __init__(self, save_dir):
        super().__init__(save_dir, enabled=True, tensorboard=False)
        self.logged = []

    def scalars(self, step, values, prefix="train/"):
        self.logged.append(values)


def test_where_accuracy_is_a_percentage_in_tensorboard_as_on_the_console(tmp_path):
    log = Recorder(tmp_path)
    progress = EpochProgress(log, torch.device("cpu"), batch_size=8, iters_per_epoch=4, epoch=0, fields=console)
    parts = {"loss": torch.tensor(2.0), "loss_where": torch.tensor(0.5), "loss_what": torch.tensor(1.5),
             "where_acc": torch.tensor(0.75)}
    progress.record(parts, {"lr": 0.1, "momentum": 0.99}, data_s=0.5, batch_s=2.0)
    progress.line(step=1, iteration=1, eta="?", extra={})
    log.close()
    assert log.logged[0]["where_acc"] == 75.0 and log.logged[0]["loss"] == 2.0
    assert "Where_acc 75.0 (75.0)" in (tmp_path / "log.txt").read_text()


def test_any_scalars_are_logged_with_the_generic_line(tmp_path):
    """A method's own scalars, whatever their names, reach TensorBoard every step and the console line
    (``Loss`` first, accuracies in percent) without the monitor knowing them."""
    log = Recorder(tmp_path)
    progress = EpochProgress(log, torch.device("cpu"), batch_size=4, iters_per_epoch=10, epoch=1)
    for i in range(3):
        progress.record({"loss": torch.tensor(1.0 + i), "ctr_acc": torch.tensor(0.5), "z_other": torch.tensor(-i)},
                        {"lr": 0.1, "momentum": 0.9}, data_s=0.0, batch_s=1.0)
    progress.line(step=3, iteration=3, eta="?", extra={"bad_files": 0})
    log.close()
    assert [row["loss"] for row in log.logged] == [1.0, 2.0, 3.0]
    assert log.logged[2] == {"loss": 3.0, "ctr_acc": 50.0, "z_other": -2.0, "lr": 0.1, "momentum": 0.9,
                             "data_time": 0.0, "img_per_s": 4.0, "bad_files": 0}
    line = (tmp_path / "log.txt").read_text()
    fields = "Loss 3.0000e+00 (2.0000e+00)\tctr_acc 50.0 (50.0)\tz_other -2.0000e+00 (-1.0000e+00)"
    assert f"LR 1.0000e-01\t{fields}\timg/s" in line


def test_loader_check_warns_once_with_both_rates():
    lines: list[str] = []
    check = LoaderCheck(lines.append, batch_size=64, workers=4, steps=4)
    check.record(data_s=30.0, batch_s=31.0)  # the first step starts the workers: not counted
    for _ in range(4):
        check.record(data_s=0.5, batch_s=2.0)  # 25 % waiting: 32 img/s delivered, the step alone 42.7 img/s
    assert len(lines) == 1 and lines[0].startswith("the input pipeline delivers 32 img/s and the step alone runs "
                                                   "at 43 img/s: 25% of the step time waits for data")
    assert "--workers (4 now" in lines[0]
    for _ in range(10):
        check.record(data_s=1.9, batch_s=2.0)
    assert len(lines) == 1  # once per run
    quiet: list[str] = []
    fed = LoaderCheck(quiet.append, batch_size=64, workers=4, steps=4)
    for _ in range(10):
        fed.record(data_s=0.1, batch_s=2.0)  # 5 %: the GPU hardly waits
    assert quiet == []
