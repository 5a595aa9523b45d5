"""Where the remote artifact cache is and how it is used.

$TORCHAT_REMOTE_CACHE (a URL; `off` turns a configured cache off), $TORCHAT_REMOTE_CACHE_MODE and
$TORCHAT_REMOTE_CACHE_TIMEOUT, each over the same field of the `[cache]` table of the config file
($TORCHAT_CONFIG, else $XDG_CONFIG_HOME/torchat/config.toml, else ~/.config/torchat/config.toml):

    [cache]
    url = "s3://team-bucket/torchat"   # or gs://bucket/prefix, file:///shared/torchat-cache
    mode = "read-write"                # or "read-only", the default: look up and download, never write
    timeout = 10                       # seconds one request may take before the remote counts as down
    [cache.options]                    # given to the fsspec driver as is
    endpoint_url = "http://minio.lan:9000"

Credentials never come from here: the driver reads them from its standard places (AWS_* variables and
~/.aws/ for s3fs, GOOGLE_APPLICATION_CREDENTIALS or gcloud's for gcsfs), a credential-like option or a URL with
a user and password is refused, and `redact` scrubs the secrets the drivers read from anything torchat prints.
Standard library only.
"""

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from torchat.errors import TorchatError, unknown_key_error

URL_ENV, MODE_ENV, TIMEOUT_ENV, CONFIG_ENV = ("TORCHAT_REMOTE_CACHE", "TORCHAT_REMOTE_CACHE_MODE",
                                              "TORCHAT_REMOTE_CACHE_TIMEOUT", "TORCHAT_CONFIG")
DEFAULT_TIMEOUT = 10.0
# the variables where drivers find secrets: their values never reach a message
SECRET_ENVS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
               "GOOGLE_OAUTH_ACCESS_TOKEN", "GCSFS_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN",
               "AZURE_STORAGE_CONNECTION_STRING")
_CREDENTIAL_WORDS = ("secret", "token", "password", "credential", "passwd")
_CREDENTIAL_KEYS = {"key", "username", "access_key", "access_key_id", "account_key", "sas_token"}


class Mode(StrEnum):
    READ_ONLY = "read-only"
    READ_WRITE = "read-write"


@dataclass(frozen=True)
class CacheConfig:
    url: str                       # with its scheme; never with credentials
    mode: Mode = Mode.READ_ONLY
    timeout: float = DEFAULT_TIMEOUT
    options: dict = field(default_factory=dict, hash=False, compare=False)  # the driver's, checked for secrets
    origin: str = ""               # where the settings came from, for messages

    @property
    def writable(self) -> bool:
        return self.mode == Mode.READ_WRITE

    @property
    def identity(self) -> str:
        """One string per distinct remote set-up (the store keeps one opened remote per identity)."""
        return json.dumps([self.url, self.mode, self.timeout, self.options], sort_keys=True, default=str)


def config_path() -> Path:
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "torchat" / "config.toml"


def _read_table(path: Path) -> dict:
    if not path.is_file():
        if os.environ.get(CONFIG_ENV):
            raise TorchatError(f"{CONFIG_ENV}={path}: no such file; point it at a config.toml or unset it")
        return {}
    try:
        table = tomllib.loads(path.read_text()).get("cache", {})
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TorchatError(f"{path}: not a readable TOML file ({error}); fix it or point {CONFIG_ENV} elsewhere")
    if not isinstance(table, dict):
        raise TorchatError(f"{path}: `cache` must be a table ([cache]); see docs/remote-cache.md")
    unknown = set(table) - {"url", "mode", "timeout", "options"}
    if unknown:
        raise TorchatError(f"{path}: [cache] has no key {sorted(unknown)[0]!r}; the keys are url, mode, timeout, "
                           "options")
    return table


def check_url(url: str, origin: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or not rest.strip("/"):
        raise TorchatError(f"{origin}: {url!r} is not a URL; give its scheme and place, e.g. s3://bucket/prefix, "
                           "gs://bucket/prefix or file:///shared/cache")
    if "@" in rest.partition("/")[0]:
        raise TorchatError(f"{origin}: the URL holds a user or password; drop them and give the credentials in "
                           "the driver's standard places (AWS_* variables, ~/.aws/credentials, ...)")
    return url.rstrip("/")


def _check_options(options, origin: str, where: str = "[cache.options]") -> None:
    if not isinstance(options, dict):
        raise TorchatError(f"{origin}: {where} must be a table of the fsspec driver's options")
    for name, value in options.items():
        lowered = name.lower()
        if lowered in _CREDENTIAL_KEYS or any(word in lowered for word in _CREDENTIAL_WORDS):
            raise TorchatError(f"{origin}: {where} {name}: credentials do not go in torchat's config; give them in "
                               "the driver's standard places (AWS_* variables, ~/.aws/credentials, ...)")
        if isinstance(value, dict):
            _check_options(value, origin, f"{where}.{name}")


def load_cache_config() -> CacheConfig | None:
    """The remote cache's settings; None when none is configured (or $TORCHAT_REMOTE_CACHE is `off`)."""
    path = config_path()
    table = _read_table(path)
    url, url_origin = table.get("url"), f"{path}: [cache] url"
    if os.environ.get(URL_ENV):
        url, url_origin = os.environ[URL_ENV], URL_ENV
    if url in (None, "", "off"):
        return None
    if not isinstance(url, str):
        raise TorchatError(f"{url_origin}: must be a string URL such as s3://bucket/prefix")
    url = check_url(url, url_origin)
    mode, mode_origin = os.environ.get(MODE_ENV) or table.get("mode", Mode.READ_ONLY), MODE_ENV
    if not os.environ.get(MODE_ENV):
        mode_origin = f"{path}: [cache] mode"
    if mode not in list(Mode):
        raise unknown_key_error(f"cache mode ({mode_origin})", str(mode), list(Mode))
    timeout = os.environ.get(TIMEOUT_ENV) or table.get("timeout", DEFAULT_TIMEOUT)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not 0 < timeout <= 3600:
        raise TorchatError(f"cache timeout {timeout!r} ({TIMEOUT_ENV} or [cache] timeout in {path}): give seconds, "
                           "more than 0 and at most 3600")
    options = table.get("options", {})
    _check_options(options, str(path))
    return CacheConfig(url, Mode(mode), timeout, options, url_origin)


def secrets() -> list[str]:
    """The secret values the drivers may use, as found in the environment (long enough to be worth scrubbing)."""
    return [v for v in (os.environ.get(name, "") for name in SECRET_ENVS) if len(v) >= 4]


def redact(text: str) -> str:
    """`text` without the secrets of the environment, URL passwords and presigned-URL signatures, on one line."""
    for secret in secrets():
        text = text.replace(secret, "***")
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    text = re.sub(r"(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s\"']+", r"\1***", text, flags=re.I)
    return " ".join(text.split())
