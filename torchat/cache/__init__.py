"""The remote artifact cache: the store's artifacts shared between machines through any object store that fsspec
reaches (s3:// through s3fs, gs:// through gcsfs, file:// for a shared or network directory).

    config.py   where the remote is and how it is used (TORCHAT_REMOTE_CACHE, or [cache] in the config file)
    remote.py   the remote's layout, lookups, verified downloads, uploads, verify and gc (imports fsspec)
    sync.py     push, pull and status of targets and their inputs (what `torchat cache` runs)

The store (torchat/store.py) looks every key up before it builds a step and uploads what it built; this package
imports nothing at import time beyond the standard library, so `doit list` stays as light as it was.
"""
