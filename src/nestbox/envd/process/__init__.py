"""envd's process service: start, attach to, feed, signal and list processes in the guest.

registry.py   ProcessRegistry: pid/tag table; owns every process's pump; kills all on aclose
proc.py       ManagedProcess: spawn (own session + process group), pump, input, signals
fanout.py     bounded per-subscriber queues; the slow-reader policy
fdio.py       non-blocking fd reads/writes on the event loop
pty.py        PTY pairs, window size, controlling terminal
signals.py    exit statuses, process-group signals, session sweeps
request.py    Start request + headers -> ProcessSpec (user, env, cwd)
service.py    the `process.Process` Connect service
"""
