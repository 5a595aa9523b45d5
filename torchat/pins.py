"""The pin lock: the sha256 of each model file that targets/models.toml leaves "unpinned", recorded by the file's
first download (pin on first use) in `<targets>/pins.lock`, which the user commits like any lock file.

The build graph reads it (torchat.spec): a file pinned there is pinned, and its key uses the digest. Later
downloads must match it; only --allow-unpinned lets a file with other bytes replace its pin. The lock is JSON,
{"format": 1, "sha256": {SOURCE: SHA256}}, keyed by the source string as models.toml writes it (models that share
a file share its pin). Standard library only.
"""

import json
import re
from pathlib import Path

from torchat.errors import TorchatError
from torchat.publish import locked, publish_file

LOCK_NAME = "pins.lock"
FORMAT = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


def lock_path(targets_dir: Path | str) -> Path:
    return Path(targets_dir) / LOCK_NAME


def is_sha256(value) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def read_pins(targets_dir: Path | str) -> dict[str, str]:
    """Source -> pinned sha256 from the targets directory's lock; {} when there is none yet."""
    path = lock_path(targets_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise TorchatError(f"{path}: unreadable ({error}); restore it from version control, or delete it (the next "
                           "downloads pin their files again)") from None
    pins = data.get("sha256") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not (isinstance(pins, dict) and all(isinstance(k, str) and is_sha256(v) for k, v in pins.items())):
        raise TorchatError(f"{path}: not a pin lock ({{\"format\": {FORMAT}, \"sha256\": {{SOURCE: 64 lowercase hex "
                           "digits}}); restore it from version control, or delete it")
    return pins


def record_pin(targets_dir: Path | str, source: str, sha256: str) -> None:
    """Pin `source` to `sha256` in the lock (replacing its pin, if any), atomically and under a lock."""
    assert is_sha256(sha256), sha256
    path = lock_path(targets_dir)
    with locked(path.parent):  # the directory: the lock file itself is replaced by a rename
        pins = read_pins(targets_dir)
        if pins.get(source) == sha256:
            return
        pins[source] = sha256
        with publish_file(path) as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "sha256": dict(sorted(pins.items()))}, indent=1) + "\n")
