"""torchat's rows and the llama.cpp peers with AVX-512 hidden, on an AVX-512 machine: an emulation of the
AVX2-only CPU the speed targets name, for sessions that are not given one.

    python benchmarks/avx2_emulation.py [--rows 8da4w-et,8da8w-et,int4-aoti] [--runs 5] [--wait-quiet 60]

Neither library has a switch for its instruction set, so:
- XNNPACK picks its kernels from cpuinfo's `cpuinfo_isa` flags, read once when XNNPACK initializes. Every
  measurement process starts with a `sitecustomize` hook (on PYTHONPATH) that runs cpuinfo's detection first and
  clears the AVX-512 flags and AVX-VNNI (which the AVX2-only EPYC lacks too) in that struct (exported by executorch's
  libexecutorch_threadpool.so), before executorch is imported. The hook checks the struct's layout against
  /proc/cpuinfo and refuses to run if they disagree.
- MKL (ExecuTorch's attention calls its sgemm) gets MKL_ENABLE_INSTRUCTIONS=AVX2, torch's own kernels
  ATEN_CPU_CAPABILITY=avx2, torchat's own attention kernel (torchat.kernels) TORCHAT_KERNEL_MARCH=x86-64-v3 (it is
  otherwise compiled -march=native).
- llama.cpp is built a second time, without AVX-512 (GGML_NATIVE=OFF, AVX2+FMA+F16C), into its own directory
  under the cache, and put first on the peers' PYTHONPATH.
- An AOTI row is exported again for AVX2: Inductor compiles with TORCHINDUCTOR_CPP_MARCH=x86-64-v3 and picks its
  vector ISA from ATEN_CPU_CAPABILITY, oneDNN gets ONEDNN_MAX_CPU_ISA=AVX2; both variables enter the build's store key
  (torchat.spec.toolchain), so the AVX2 .pt2 is an artifact of its own beside the native one.
Same memory system, caches and clocks as the host, so this is the AVX2 kernels' speed on this machine, not the AVX2
machine's: a check on the ratios, not a replacement for measuring there. Writes
benchmarks/results/avx2-emulated/bench.{json,md,png}.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CPP_AVX2_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                        "-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF "
                        "-DGGML_AVX_VNNI=OFF")

# cpuinfo's struct cpuinfo_x86_isa on x86-64 (torch/include/cpuinfo.h, the same cpuinfo executorch builds): one
# bool a flag, in this order; the AVX-512 family, AVX10 and AVX-VNNI (Intel's VEX form, from Alder Lake and Sapphire
# Rapids on) are what an AVX2-only CPU lacks
ISA_FIELDS = ("rdtscp rdpid sysenter msr clzero clflush clflushopt mwait mwaitx fxsave xsave three_d_now "
              "three_d_now_plus prefetch prefetchw prefetchwt1 sse3 ssse3 sse4_1 sse4_2 sse4a misaligned_sse avx "
              "avxvnni fma3 fma4 xop f16c avx2 avx512f avx512pf avx512er avx512cd avx512dq avx512bw avx512vl "
              "avx512ifma avx512vbmi avx512vbmi2 avx512bitalg avx512vpopcntdq avx512vnni avx512bf16 avx512fp16 "
              "avx512vp2intersect avx512_4vnniw avx512_4fmaps avx10_1 avx10_2").split()
# fields whose /proc/cpuinfo name differs
PROC_NAMES = {"fma3": "fma", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512vnni": "avx512_vnni",
              "avx512bf16": "avx512_bf16", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
              "avx512fp16": "avx512_fp16", "avx512vp2intersect": "avx512_vp2intersect", "sse4_1": "sse4_1",
              "sse3": "pni", "avxvnni": "avx_vnni"}
CHECKED = ("sse3", "ssse3", "sse4_1", "sse4_2", "avx", "fma3", "f16c", "avx2", "avx512f", "avx512cd", "avx512dq",
           "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16", "avxvnni")

HOOK = '''
import ctypes, glob, os, sys
from pathlib import Path

FIELDS = {fields!r}
PROC = {proc!r}
CHECKED = {checked!r}
libs = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "executorch", "lib",
                              "libexecutorch_threadpool.so"))
if not libs:
    raise SystemExit("avx2 emulation: executorch's libexecutorch_threadpool.so not found under " + sys.prefix)
lib = ctypes.CDLL(os.path.realpath(libs[0]), mode=ctypes.RTLD_GLOBAL)
if not lib.cpuinfo_initialize():
    raise SystemExit("avx2 emulation: cpuinfo_initialize failed")
isa = (ctypes.c_bool * len(FIELDS)).in_dll(lib, "cpuinfo_isa")
flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("flags")).split(":", 1)[1].split())
wrong = [n for n in CHECKED if bool(isa[FIELDS.index(n)]) != (PROC.get(n, n) in flags)]
if wrong:
    raise SystemExit("avx2 emulation: cpuinfo_isa's layout does not match /proc/cpuinfo at " + ", ".join(wrong))
for index, name in enumerate(FIELDS):
    if name.startswith("avx512") or name.startswith("avx10") or name == "avxvnni":
        isa[index] = False
'''


EMULATION_NOTE = ("**AVX2 emulated** (`benchmarks/avx2_emulation.py`): AVX-512 and AVX-VNNI hidden from XNNPACK "
                  "(cpuinfo's flags cleared), MKL, oneDNN and ATen held to AVX2, torchat's attention kernel and an "
                  "AOTI row's Inductor code compiled for x86-64-v3, llama.cpp built without AVX-512; the host named "
                  "here has AVX-512, its memory system and clocks are this machine's.")


def build_llama_cpp_avx2(target: Path) -> None:
    """llama-cpp-python built without AVX-512 into `target` (once; minutes)."""
    if (target / "llama_cpp").is_dir():
        return
    scratch = target.with_name(target.name + ".part")
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_AVX2_FLAGS}
    # --no-cache-dir: pip's wheel cache is keyed by the sdist, not CMAKE_ARGS, and would hand back a native build
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--no-binary",
                    "llama-cpp-python", "--target", str(scratch), f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                    "diskcache"],  # llama_cpp imports it; --no-deps leaves it out of the target
                   env=env, check=True)
    info = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info())"],
                          env={**os.environ, "PYTHONPATH": str(scratch)}, capture_output=True, text=True, check=True)
    if "AVX512 = 1" in info.stdout or "AVX2 = 1" not in info.stdout:
        raise SystemExit(f"{scratch}: not an AVX2-only llama.cpp build: {info.stdout.strip()}")
    scratch.rename(target)


# AVX-512's registers in objdump's AT&T syntax: zmm, the upper 16 ymm/xmm (EVEX only) and the mask registers
AVX512_REGISTERS = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[1-7]\b")


def build_kernels_avx2(env: dict) -> None:
    """torchat's kernel libraries (ExecuTorch's and torch's) built for x86-64-v3 (the measurement processes then find
    them in the cache), checked to use no AVX-512 register."""
    for builder in ("et_kernels_library", "torch_kernels_library"):
        library = subprocess.run([sys.executable, "-c", f"from torchat.kernels import {builder} as k; print(k())"],
                                 env=env, capture_output=True, text=True, check=True).stdout.strip()
        listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                                 check=True).stdout
        if AVX512_REGISTERS.search(listing):
            raise SystemExit(f"{library}: uses AVX-512 registers though built with TORCHAT_KERNEL_MARCH=x86-64-v3")


def emulation_environment(hook_dir: Path) -> dict:
    """The variables a measurement process (and an AOTI export) needs to run with AVX-512 hidden: the cpuinfo hook
    written into `hook_dir` and the AVX2 llama.cpp (built once) first on PYTHONPATH, MKL, oneDNN, ATen and Inductor
    held to AVX2, torchat's kernel built for AVX2."""
    sys.path.insert(0, str(ROOT))
    from torchat.sources import cache_dir

    llama = cache_dir() / "llama-cpp-avx2"
    build_llama_cpp_avx2(llama)
    Path(hook_dir, "sitecustomize.py").write_text(HOOK.format(fields=ISA_FIELDS, proc=PROC_NAMES, checked=CHECKED))
    env = {"PYTHONPATH": os.pathsep.join([str(hook_dir), str(llama), os.environ.get("PYTHONPATH", "")]),
           "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "TORCHAT_KERNEL_MARCH": "x86-64-v3",
           "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    build_kernels_avx2({**os.environ, **env})
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8da4w-et,8da8w-et")
    parser.add_argument("--peers", default="llama.cpp-q4_1,llama.cpp-q8_0")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--wait-quiet", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/avx2-emulated")
    args = parser.parse_args()
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    if "avx512f" not in flags:
        raise SystemExit("this CPU has no AVX-512: measure it directly with benchmarks/run_all.py")

    with tempfile.TemporaryDirectory(prefix="torchat-avx2-") as hook_dir:
        env = {**os.environ, **emulation_environment(Path(hook_dir))}
        rc = subprocess.run([sys.executable, str(ROOT / "benchmarks/run_all.py"), "--rows", args.rows,
                             "--peers", args.peers, "--runs", str(args.runs), "--threads", "2",
                             "--wait-quiet", str(args.wait_quiet), "--output", str(args.output)], env=env).returncode
    report = args.output / "bench.md"
    if report.is_file():  # the host line there names the real CPU's flags: say what was hidden
        title, rest = report.read_text().split("\n", 1)
        report.write_text(f"{title}\n\n{EMULATION_NOTE}\n{rest}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
