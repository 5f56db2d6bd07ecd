"""The static gates of the CUDA compile check (tests/static): they must catch what they claim to.

`make cuda-check` runs them on the real ptxas log and SASS; here they get small synthetic inputs
with a known defect and must report it (and pass a clean one).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "static"))

import ptxas_report  # noqa: E402
import sass_report  # noqa: E402

_ENTRY = """ptxas info    : Compiling entry function '{n}' for 'sm_90'
ptxas info    : Function properties for {n}
    {sf} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads
ptxas info    : Used {r} registers, used 1 barriers, 896 bytes smem
"""
BF16 = "_ZN7softcal4cuda15tsce_fwd_kernelIN3c108BFloat16ELi256ELi1EEEvNS1_6CEArgsIT_EE"
F64 = "_ZN7softcal4cuda15tsce_fwd_kernelIdLi256ELi1EEEvNS1_6CEArgsIT_EE"
F32 = "_ZN7softcal4cuda15tsce_fwd_kernelIfLi256ELi1EEEvNS1_6CEArgsIT_EE"


def _log(tmp_path, entries):
    p = tmp_path / "ptxas.log"
    p.write_text("".join(_ENTRY.format(n=n, sf=sf, st=st, ld=ld, r=r) for n, sf, st, ld, r in entries))
    return str(p)


def test_ptxas_gate_fails_on_a_bf16_spill_and_allows_float64(tmp_path, capsys):
    clean = _log(tmp_path, [(BF16, 0, 0, 0, 64), (F32, 0, 0, 0, 48), (F64, 80, 40, 32, 80)])
    assert ptxas_report.main([clean, "--fail-on-spill"]) == 0
    kernels = ptxas_report.parse(open(clean).read())
    assert [k.dtype for k in kernels] == ["bfloat16", "float32", "float64"]
    assert "allowed (float64)" in capsys.readouterr().out
    bad = _log(tmp_path, [(BF16, 16, 8, 8, 64), (F32, 0, 0, 0, 48)])
    assert ptxas_report.main([bad, "--fail-on-spill"]) == 1
    assert ptxas_report.main([bad]) == 0  # report only
    assert ptxas_report.main([clean, "--min-kernels", "5"]) == 1  # a log that lost its -v lines


_SASS = """
	code for sm_90
		Function : {name}
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.64 R4, desc[UR36][R4.64] ;
        /*0020*/                   {load} R8, desc[UR36][R10.64] ;
        /*0030*/                   MUFU.EX2 R41, R38 ;
        /*0040*/                   FADD.FTZ R0, R41, R36 ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_sass_gate_wants_16_byte_loads_in_the_hot_loop(capsys):
    good = sass_report.parse(_SASS.format(name=BF16, load="LDG.E.128"))
    assert sass_report.report(good, check=True) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out and "0 problems" in out
    narrow = sass_report.parse(_SASS.format(name=BF16, load="LDG.E.U16"))
    assert sass_report.report(narrow, check=True) == 1
    assert "no loop with 16-byte global loads" in capsys.readouterr().out
    spill = sass_report.parse(_SASS.format(name=F32, load="LDG.E.128").replace("MUFU.EX2 R41, R38", "STL [R1], R38"))
    assert sass_report.report(spill, check=True) == 1
