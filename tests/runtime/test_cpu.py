"""Capability detection and the precision rule, on injected flag sets (any CPU can run these)."""

from __future__ import annotations

import pytest

from facepipe.runtime import cpu
from facepipe.runtime.cpu import PrecisionError, resolve_precision, unsupported_reason

SAPPHIRE = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}
HASWELL = {"avx2", "fma"}


def test_flags_are_read_from_proc_cpuinfo():
    flags = cpu.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux x86: the basics every such CPU has
        assert "sse2" in flags or "fp" in flags
    assert cpu.cpu_model() in cpu.cpu_summary()


def test_fp32_is_always_fp32():
    assert resolve_precision("fp32", "mobilefacenet", flags=set()) == "fp32"
    assert resolve_precision("fp32", "retinaface", flags=SAPPHIRE, device="cuda") == "fp32"


def test_bf16_needs_the_instructions_and_openvino():
    assert resolve_precision("bf16", "mobilefacenet", flags=SAPPHIRE, has_openvino=True) == "bf16"
    with pytest.raises(PrecisionError, match="avx512_bf16"):
        resolve_precision("bf16", "mobilefacenet", flags=HASWELL, has_openvino=True)
    with pytest.raises(PrecisionError, match=r"facepipe\[openvino\]"):
        resolve_precision("bf16", "mobilefacenet", flags=SAPPHIRE, has_openvino=False)


def test_int8_needs_vnni():
    assert unsupported_reason("int8", flags={"avx512_vnni"}) is None
    assert unsupported_reason("int8", flags={"avx_vnni"}) is None
    with pytest.raises(PrecisionError, match="VNNI"):
        resolve_precision("int8", "mobilefacenet", flags=HASWELL)


def test_unsupported_precision_is_one_line():
    for precision, flags in (("bf16", HASWELL), ("int8", HASWELL), ("fp8", SAPPHIRE)):
        reason = unsupported_reason(precision, flags=flags, has_openvino=True)
        assert reason and "\n" not in reason


def test_reduced_precision_is_a_cpu_option():
    with pytest.raises(PrecisionError, match="CPU option"):
        resolve_precision("bf16", "mobilefacenet", flags=SAPPHIRE, has_openvino=True, device="cuda")
    assert resolve_precision("auto", "mobilefacenet", flags=SAPPHIRE, has_openvino=True, device="cuda") == "fp32"


def test_auto_falls_back_to_fp32_without_the_flags():
    assert resolve_precision("auto", "mobilefacenet", flags=HASWELL, has_openvino=True) == "fp32"
    assert resolve_precision("auto", "retinaface", flags=set(), has_openvino=True) == "fp32"
    assert resolve_precision("auto", "mobilefacenet", flags=SAPPHIRE, has_openvino=False) == "fp32"
    assert resolve_precision("auto", "unknown-model", flags=SAPPHIRE, has_openvino=True) == "fp32"


def test_auto_picks_the_first_supported_entry(monkeypatch):
    assert resolve_precision("auto", "mobilefacenet", flags=SAPPHIRE, has_openvino=True) == cpu.AUTO_ORDER["mobilefacenet"][0]
    monkeypatch.setitem(cpu.AUTO_ORDER, "mobilefacenet", ("int8", "bf16"))
    # int8 only with a calibration, and only where VNNI is
    assert resolve_precision("auto", "mobilefacenet", flags=SAPPHIRE, has_openvino=True) == "bf16"
    assert resolve_precision("auto", "mobilefacenet", flags=SAPPHIRE, has_openvino=True, has_calibration=True) == "int8"
    assert resolve_precision("auto", "mobilefacenet", flags={"avx512_bf16"}, has_openvino=True, has_calibration=True) == "bf16"
