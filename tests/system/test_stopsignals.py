"""The stop signals: ignored by workers, held back while processes start."""
import signal
import threading

from w2ssl.system import stopsignals


def test_a_signal_inside_blocked_waits_for_the_end_and_ignore_unblocks():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda sig, frame: seen.append(sig))
    try:
        with stopsignals.blocked():
            # To this thread: a signal to the process may go to another thread (xdist's, torch's) that lets it in.
            signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            assert seen == [] and signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert seen == [signal.SIGUSR1]  # delivered on leaving, to the handler in place
        assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGUSR1, previous)
