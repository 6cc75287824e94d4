"""training.amp=auto (issue 16): bf16 where the device computes in bf16 natively, fp32 elsewhere,
and the log says which was chosen."""

from __future__ import annotations

import pytest
import torch

from ddp_seq.cli import main
from ddp_seq.train.amp import autocast, native_bf16, resolve_amp

CPU = torch.device("cpu")


def _cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


def test_auto_follows_the_cpu_instruction_sets(monkeypatch):
    assert resolve_amp("none", CPU) == "none" and resolve_amp("bf16", CPU) == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16(CPU) in ("avx512_bf16", "amx_bf16") and resolve_amp("auto", CPU) == "bf16"
    _cpu_without_bf16(monkeypatch)
    assert native_bf16(CPU) is None and resolve_amp("auto", CPU) == "none"


def test_auto_runs_the_model_in_the_chosen_precision(monkeypatch):
    layer = torch.nn.Linear(8, 8)
    expected = torch.bfloat16 if native_bf16(CPU) else torch.float32
    with autocast(CPU, "auto"):
        assert layer(torch.randn(2, 8)).dtype == expected
    _cpu_without_bf16(monkeypatch)
    with autocast(CPU, "auto"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_the_log_says_what_auto_chose(tiny_yaml, tmp_path, capsys):
    # Trained in this process (cli.main, as train.py calls it): the line is the trainer's log, not
    # the launcher's, and a process start would cost more than the whole tiny run.
    assert main(["train", "--config", str(tiny_yaml), f"logging.root={tmp_path}", "training.amp=auto",
                 "training.epochs=1", "checkpoint.save=false"]) == 0
    native = native_bf16(CPU)
    line = next(x for x in capsys.readouterr().out.splitlines() if "training.amp=auto" in x)
    if native:
        assert line.endswith(f"training.amp=auto: bf16 autocast ({native} on cpu)")
    else:
        assert line.endswith("training.amp=auto: fp32 (cpu has no native bf16)")


@pytest.mark.gpu
def test_auto_on_cuda_follows_the_compute_capability():
    device = torch.device("cuda", 0)
    major, _ = torch.cuda.get_device_capability(device)
    assert resolve_amp("auto", device) == ("bf16" if major >= 8 else "none")
