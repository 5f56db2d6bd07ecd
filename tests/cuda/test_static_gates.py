"""The static gates of the CUDA compile check (tests/static): they must catch what they claim to.

`make cuda-check` runs them on the real ptxas log and SASS; here they get small synthetic inputs
with a known defect and must report it (and pass a clean one).
"""
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static"))

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


# A soft-target kernel of float32 logits and a float32 target: both template arguments are
# mangled as 'f' ("Iff"), which the dtype test once missed (the kernel then counted as "other" and
# its spills passed the gate).
SOFT_F32 = "_ZN7softcal4cuda12_GLOBAL__N_122soft_target_fwd_kernelIffLi4ELb0EEEvNS1_8SoftArgsIT_T0_EE"


def test_ptxas_gate_reads_the_dtype_of_two_argument_kernels(tmp_path):
    kernels = ptxas_report.parse(open(_log(tmp_path, [(SOFT_F32, 16, 8, 8, 64)])).read())
    assert [k.dtype for k in kernels] == ["float32"]
    assert ptxas_report.main([_log(tmp_path, [(SOFT_F32, 16, 8, 8, 64)]), "--fail-on-spill"]) == 1


def test_static_compare_matches_kernels_across_the_renames(tmp_path, capsys):
    """The baseline's kernel names (tsce_*, integer variants) and today's meet on one key, and a
    kernel with more instructions per element after than before fails --check."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static"))
    import static_compare

    old = "tsce_fwd_kernel<BFloat16, 256, 1>"
    new = "cross_entropy_fwd_kernel<BFloat16, 256, softcal::Smoothing::kOn, softcal::ClassWeights::kNone>"
    assert static_compare.canonical(old) == static_compare.canonical(new)
    assert static_compare.canonical("tsce_soft_bwd_kernel<float, 4, true>") == \
        static_compare.canonical("soft_target_bwd_kernel<float, float, 4, softcal::ClassWeights::kPerClass>")
    assert static_compare.canonical("tsce_tile_kernel<Half, 2, 2>") == static_compare.canonical(
        "ce_tile_kernel<Half, softcal::Pass::kFused, softcal::Smoothing::kOn, softcal::ClassWeights::kPerClass>")
    assert static_compare.canonical("tsce_fused_kernel<float, 512, 4, true, 0>") == static_compare.canonical(
        "cross_entropy_fused_kernel<float, 512, 4, true, softcal::Smoothing::kOff, softcal::ClassWeights::kNone>")
    # the soft-cap's kOff kernels are the kernels before it; its kOn kernels are new
    cap = "cross_entropy_fwd_kernel<BFloat16, 256, (softcal::Smoothing)1, (softcal::ClassWeights)0, (softcal::Softcap){}>"
    assert static_compare.canonical(cap.format(0)) == static_compare.canonical(old)
    assert static_compare.canonical(cap.format(1)) != static_compare.canonical(old)
    assert static_compare.canonical("shard_grad_kernel<double, 8, 1>") == static_compare.canonical(
        "shard_grad_kernel<double, 8, softcal::Smoothing::kOn, softcal::ClassWeights::kNone>")

    def sass_csv(path, name, ipe):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["kernel", "key", "dtype", "loop", "ld128", "narrow", "ins_per_elem"])
            w.writerow([name, static_compare.canonical(name), "bfloat16", 100, 8, 0, ipe])
        return str(path)

    before = sass_csv(tmp_path / "before.csv", old, "12.0")
    assert static_compare.main(["--sass", before, sass_csv(tmp_path / "same.csv", new, "12.0"), "--check"]) == 0
    assert static_compare.main(["--sass", before, sass_csv(tmp_path / "worse.csv", new, "12.5"), "--check"]) == 1
    assert "MORE: cross_entropy_fwd_kernel<BFloat16, 256, 1, 0>: 12.00 -> 12.50" in capsys.readouterr().out
    # --matched: the table leaves out a kernel only one build has (a new soft-cap variant)
    capped = sass_csv(tmp_path / "capped.csv", cap.format(1), "30.0")
    static_compare.main(["--sass", before, capped])
    assert "| 12.0 | 30.0 |" in capsys.readouterr().out
    static_compare.main(["--sass", before, capped, "--matched"])
    assert "30.0" not in capsys.readouterr().out
