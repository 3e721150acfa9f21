"""The process and its host: stop signals, fail-fast between processes, disk space, the run-folder lock."""
