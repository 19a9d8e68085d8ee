"""CPU memory: the pinned glibc mmap threshold returns freed buffers of a few MiB to the OS (the trainer pins it on
CPU), and the CLI relaunches itself under tcmalloc where it is installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from undial_peft import UndialConfig
from undial_peft.errors import UndialConfigError
from undial_peft.training import trainer as trainer_module
from undial_peft.utils import cpu_memory

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc only")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux only")

# 64 buffers of 2 MiB, every other one freed: the live ones between keep the heap from shrinking at its
# top. First a freed 16 MiB block, which raises glibc's adaptive threshold to 16 MiB (as activations do).
FREED_MIB = textwrap.dedent("""
    import sys
    from undial_peft.utils.cpu_memory import pin_mmap_threshold

    def rss_mib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) / 1024

    big = b"\\1" * (16 << 20)
    del big
    if sys.argv[1] == "pin":
        assert pin_mmap_threshold(128 * 1024)
    blocks = [b"\\1" * (2 << 20) for _ in range(64)]  # written: their pages are resident
    before = rss_mib()
    del blocks[::2]
    print(before - rss_mib())
""")


def _returned_mib(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", FREED_MIB, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


@glibc_only
def test_pinned_threshold_returns_freed_buffers_and_adaptive_one_keeps_them():
    assert _returned_mib("adaptive") < 16  # the 64 MiB stay in the heap: the slack the pin removes
    assert _returned_mib("pin") > 60


@glibc_only
@pytest.mark.parametrize(("threshold", "pinned"), [(128 * 1024, [128 * 1024]), (0, [])])
def test_trainer_pins_the_configured_threshold_on_cpu(tiny_dir, tmp_path, monkeypatch, threshold, pinned):
    from undial_peft.models import load_model

    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "pin_mmap_threshold", lambda value: calls.append(value) or True)
    model, _ = load_model(tiny_dir)
    config = UndialConfig(output_dir=str(tmp_path), use_cpu=True, cpu_mmap_threshold=threshold)
    trainer_module.UndialTrainer(model=model, args=config)
    assert calls == pinned


def test_threshold_above_glibc_limit_is_refused():
    with pytest.raises(UndialConfigError, match="cpu_mmap_threshold"):
        UndialConfig(output_dir="unused", cpu_mmap_threshold=64 * 2**20)


def _libraries(monkeypatch, found: dict[str, str]) -> None:
    """Pretend ``find_library`` knows exactly ``found`` (library name -> file)."""
    monkeypatch.setattr(cpu_memory.ctypes.util, "find_library", found.get)


@linux_only
def test_allocator_environment_preloads_the_named_library_ahead_of_the_users(monkeypatch):
    _libraries(monkeypatch, {"tcmalloc_minimal": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"})
    env = cpu_memory.allocator_environment("auto", {"LD_PRELOAD": "libmine.so", "HOME": "/h"})
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4 libmine.so", "HOME": "/h", cpu_memory.RELAUNCHED: "tcmalloc"}
    env = cpu_memory.allocator_environment("jemalloc", {})
    assert env == {"LD_PRELOAD": "libjemalloc.so.2", cpu_memory.RELAUNCHED: "jemalloc"}


@linux_only
@pytest.mark.parametrize("environ", [{cpu_memory.RELAUNCHED: "tcmalloc"}, {"LD_PRELOAD": "/opt/libtcmalloc_minimal.so.4"}])
def test_allocator_environment_never_relaunches_twice(monkeypatch, environ):
    _libraries(monkeypatch, {"tcmalloc_minimal": "libtcmalloc_minimal.so.4"})
    assert cpu_memory.allocator_environment("auto", environ) is None
    assert cpu_memory.allocator_environment("system", {}) is None


@linux_only
def test_a_missing_allocator_is_skipped_by_auto_and_named_when_asked_for(monkeypatch):
    _libraries(monkeypatch, {})
    assert cpu_memory.allocator_environment("auto", {}) is None
    with pytest.raises(UndialConfigError, match="apt install libjemalloc2"):
        cpu_memory.allocator_environment("jemalloc", {})
    with pytest.raises(UndialConfigError, match="one of auto, tcmalloc, jemalloc, system"):
        cpu_memory.allocator_environment("mimalloc", {})


@linux_only
@pytest.mark.skipif(not any(map(cpu_memory.ctypes.util.find_library, cpu_memory.PRELOADS["tcmalloc"])),
                    reason="tcmalloc not installed (apt install libtcmalloc-minimal4)")
def test_relaunch_runs_the_command_again_with_tcmalloc_loaded():
    maps = "import os; print(os.environ['UNDIAL_PEFT_ALLOCATOR'], 'tcmalloc' in open('/proc/self/maps').read())"
    code = f"from undial_peft.utils.cpu_memory import relaunch_under; relaunch_under('auto', ['-c', {maps!r}])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["tcmalloc", "True"]


def test_cli_relaunches_a_command_line_run_and_never_a_callers(monkeypatch):
    from undial_peft import cli

    asked: list[str] = []

    def relaunch(choice: str) -> None:
        asked.append(choice)
        raise UndialConfigError("stop here")  # instead of exec: main answers with exit code 2

    monkeypatch.setattr(cpu_memory, "relaunch_under", relaunch)
    command = ["forget", "--data", "none.jsonl", "--out", "unused", "--allocator", "jemalloc"]
    monkeypatch.setattr(sys, "argv", ["undial-peft", *command])
    assert cli.main() == 2 and asked == ["jemalloc"]
    assert cli.main(command) == 2 and asked == ["jemalloc"]  # a caller's argv: no relaunch; the missing file stops it
