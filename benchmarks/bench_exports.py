"""SmolLM2 exports for the benchmarks that measure export flags the build graph has no target for (a KV cache
length, a quant spelling): exported once per flags, code and toolchain, under $TORCHAT_CACHE/bench-exports/.
Targets the graph declares come from the artifact store instead (run_all.py)."""

import hashlib
import json
import time
from pathlib import Path

from torchat.cli import main
from torchat.publish import publish_dir
from torchat.sources import cache_dir
from torchat.spec import STEPS, Step
from torchat.store import code_digests, toolchain_versions


def cached_export(gguf: Path, suffix: str, flags: list[str]) -> tuple[Path, bool]:
    """(artifact, exported now?) for SmolLM2 exported with `flags`."""
    info = STEPS[Step.BUILD]
    preimage = {"gguf": gguf.name, "size": gguf.stat().st_size, "suffix": suffix, "flags": flags,
                "code": code_digests((*info.code, info.module)), "toolchain": toolchain_versions(info.toolchain)}
    key = hashlib.sha256(json.dumps(preimage, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir() / "bench-exports" / key
    if (directory / f"model{suffix}").is_file():
        return directory / f"model{suffix}", False
    start = time.perf_counter()
    with publish_dir(directory) as scratch:
        rc = main(["export", "--gguf-path", str(gguf), "--output-path", str(scratch / f"model{suffix}"), *flags])
        if rc != 0:
            raise SystemExit(f"export of SmolLM2 with {flags} failed")
        (scratch / "export.json").write_text(json.dumps({"export_s": time.perf_counter() - start, **preimage}))
    return directory / f"model{suffix}", True
