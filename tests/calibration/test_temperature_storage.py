"""TemperatureScaler's storage of T (issue 18, item 7): what cannot be represented is refused,
and T keeps the precision it was fitted in (float64), through dtype casts and state_dicts."""

from __future__ import annotations

import io
import math
import sys
import warnings

import pytest
import torch

from softcal.calibration import TemperatureScaler

T_MIN = sys.float_info.min  # the documented range: T and 1/T normal float64 numbers
T_MAX = 1.0 / T_MIN


@pytest.mark.parametrize("bad", [1e-320, 5e-324, 1e308, T_MIN / 2, T_MAX * 2])
def test_unrepresentable_init_temperature_is_refused(bad):
    import softcal.calibration as cal

    assert (cal.T_MIN, cal.T_MAX) == (T_MIN, T_MAX)
    with pytest.raises(ValueError, match=r"init_temperature must be in \[T_MIN, T_MAX\]"):
        TemperatureScaler(init_temperature=bad)
    s = TemperatureScaler()
    with pytest.raises(ValueError, match=r"temperature must be in \[T_MIN, T_MAX\]"):
        s.temperature = bad
    assert s.temperature == 1.0  # unchanged


@pytest.mark.parametrize("t", [T_MIN, 1e-300, 1e-39, 3.7, 1e300, T_MAX])
def test_extreme_temperatures_are_stored_exactly(t):
    """A float32 log of T made 1e-320 zero and 1e300 infinite; float64 keeps every T in range."""
    s = TemperatureScaler(init_temperature=t)
    assert s.log_temperature.dtype == torch.float64
    assert s.temperature == pytest.approx(t, rel=1e-13)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    out = s(x)
    if 1.0 / t < 1.7e308:
        torch.testing.assert_close(out, x / t, rtol=1e-13, atol=0.0)


def test_separable_fit_with_wide_bounds_keeps_its_temperature():
    """fit(bounds=(1e-300, 1e300)) on separable data stops at 1e-300: stored as such (it was 0),
    and float32 logits, whose 1/T would overflow, are refused instead of giving inf/NaN."""
    y = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(y, 3).double() * 4.0
    s = TemperatureScaler()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = s.fit(x, y, bounds=(1e-300, 1e300))
    assert r.temperature == pytest.approx(1e-300, rel=1e-12)
    assert s.temperature == pytest.approx(1e-300, rel=1e-12) and s.temperature > 0
    out = s(x)                                          # float64: 4 / 1e-300 is finite
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match=r"cannot scale torch.float32 logits \(1/T overflows"):
        s(x.float())
    with pytest.raises(ValueError, match=r"bounds must lie in \[T_MIN, T_MAX\]"):
        s.fit(x, y, bounds=(1e-320, 1.0))


def test_the_scale_check_follows_the_parameter():
    """The overflow check is redone when T changes (setter, optimiser step), not only once."""
    s = TemperatureScaler(init_temperature=2.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(s(x), x / 2.0)
    with torch.no_grad():
        s.log_temperature.fill_(math.log(1e-40))       # 1/T = 1e40 > float32 max
    with pytest.raises(ValueError, match="cannot scale"):
        s(x)
    assert torch.isfinite(s(x.double())).all()
    s.temperature = 0.5
    torch.testing.assert_close(s(x), x / 0.5)
    with pytest.raises(ValueError, match="cannot scale torch.float16"):
        TemperatureScaler(init_temperature=1e-5)(x.half())   # 1/T = 1e5 > 65504


def test_fitted_temperature_keeps_float64_precision():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (400,), generator=g)
    x = 3 * torch.randn(400, 5, generator=g, dtype=torch.float64)
    x[torch.arange(400), y] += 2.0
    s = TemperatureScaler()
    r = s.fit(x, y, progress=False)
    assert s.temperature == pytest.approx(r.temperature, rel=1e-15)  # float32 storage: ~1e-7
    # module dtype casts (a model moved to half precision) do not round T
    for cast in (lambda m: m.half(), lambda m: m.float(), lambda m: m.to(torch.bfloat16),
                 lambda m: m.double()):
        cast(s)
        assert s.log_temperature.dtype == torch.float64
        assert s.temperature == pytest.approx(r.temperature, rel=1e-15)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    s2 = TemperatureScaler()
    s2.load_state_dict(torch.load(buf, weights_only=True))
    assert s2.temperature == s.temperature


def test_wrapped_model_cast_to_half_keeps_t_float64():
    net = torch.nn.Linear(3, 4)
    s = TemperatureScaler(net, init_temperature=2.883).half()
    assert net.weight.dtype == torch.float16 and s.log_temperature.dtype == torch.float64
    x = torch.randn(2, 3).half()
    out = s(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, net(x) / 2.883, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 800.0, -800.0])
def test_load_state_dict_refuses_what_is_not_a_temperature(bad):
    s = TemperatureScaler(init_temperature=1.5)
    with pytest.raises(ValueError, match=r"log_temperature = .* is not the log of a temperature"):
        s.load_state_dict({"log_temperature": torch.tensor(bad)})
    assert s.temperature == pytest.approx(1.5)


def test_old_float32_state_dicts_still_load():
    s = TemperatureScaler()
    s.load_state_dict({"log_temperature": torch.tensor(math.log(2.5), dtype=torch.float32)})
    assert s.log_temperature.dtype == torch.float64
    assert s.temperature == pytest.approx(2.5, rel=1e-7)
