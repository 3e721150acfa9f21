from w2ssl.monitor import ETA, AverageMeter, Logger, format_duration


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
