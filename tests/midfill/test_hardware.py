"""Which CPUs count as having bfloat16 instructions."""

from midfill.hardware import cpu_has_native_bf16


def test_native_bf16_needs_avx512_bf16_or_amx_as_whole_flags():
    assert cpu_has_native_bf16("flags\t: fpu sse2 avx512f avx512_bf16 avx512_vnni")
    assert cpu_has_native_bf16("flags\t: fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags\t: fpu sse2 avx2 avx512f avx512_vnni")
    assert not cpu_has_native_bf16("flags\t: fpu not_avx512_bf16x")
