"""The pinned glibc mmap threshold: freed buffers of a few MiB go back to the OS, and the trainer pins it on CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from undial_peft import UndialConfig
from undial_peft.errors import UndialConfigError
from undial_peft.training import trainer as trainer_module
from undial_peft.utils import cpu_memory

pytestmark = pytest.mark.skipif(cpu_memory._glibc() is None, reason="glibc only")

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


def test_pinned_threshold_returns_freed_buffers_and_adaptive_one_keeps_them():
    assert _returned_mib("adaptive") < 16  # the 64 MiB stay in the heap: the slack the pin removes
    assert _returned_mib("pin") > 60


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
