"""envd's filesystem: the `filesystem.Filesystem` Connect service and what it stands on.

    paths.py     who is asking, which path they mean, OSError → EnvdError, creating parents
    entries.py   EntryInfo from lstat, and directory walks for ListDir
    atomic.py    files written under a hidden name and renamed over their target
    watch.py     inotify watches for WatchDir and the polling watchers
    service.py   the Connect handlers

The plain-HTTP `/files` endpoints live in `nestbox.envd.files` and reuse `paths` and `atomic`.
"""
