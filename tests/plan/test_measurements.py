"""The measurement cache: keyed by backbone, resolution, dtype (and checkpointing, attention),
under $GUIE_CACHE_DIR, measured once; the shipped ViT-H-14 measurements say where and when."""
from __future__ import annotations

import json

import pytest

from guie.plan import measurements
from guie.plan.measurements import Key


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_measured_once_then_read_from_the_cache(cache_dir, monkeypatch):
    key = Key("guie-tiny-vit", 64, 0, "fp16", False)
    first = measurements.get(key)
    assert measurements.cache_path() == cache_dir / "plan" / "measurements.json"
    assert key.text() in json.loads(measurements.cache_path().read_text())

    def no_measuring(key):
        raise AssertionError(f"measured again: {key}")
    monkeypatch.setattr(measurements, "measure", no_measuring)
    assert measurements.get(key) == first
    with pytest.raises(AssertionError, match="measured again"):  # another dtype: another key
        measurements.get(Key("guie-tiny-vit", 64, 0, "off", False))


def test_a_larger_input_is_another_measurement_with_more_activations(cache_dir):
    small = measurements.get(Key("guie-tiny-vit", 64, 0, "bf16", False))
    large = measurements.get(Key("guie-tiny-vit", 96, 0, "bf16", False))
    assert large.activation_bytes(32) > 1.8 * small.activation_bytes(32)  # (96/64)^2 tokens
    assert large.forward_flops_per_image > 2 * small.forward_flops_per_image


def test_missing_measurement_without_measuring_is_none(cache_dir):
    assert measurements.get(Key("guie-tiny-vit", 72, 0, "bf16", False),
                            measure_missing=False) is None


def test_a_broken_cache_is_measured_again(cache_dir):
    measurements.cache_path().parent.mkdir(parents=True)
    measurements.cache_path().write_text("{not json")
    assert measurements.get(Key("guie-tiny-vit", 64, 0, "bf16", True)).params > 0


def test_shipped_vit_h_measurements_cover_t4_and_l4_and_say_where_they_were_taken():
    shipped = json.loads(measurements.SHIPPED.read_text())
    for amp in ("fp16", "bf16"):
        for ckpt in (True, False):
            key = Key("ViT-H-14", 224, 0, amp, ckpt)
            m = measurements._from_json(shipped[key.text()])
            assert m.key == key and m.num_blocks == 32
            assert m.params == pytest.approx(632e6, rel=0.01)
            assert "2026" in m.measured_on and "cores" in m.measured_on
            assert m.forward_flops_per_image / 1e9 == pytest.approx(334.6, rel=0.02)
            # fp16 copies of the ~630M matmul weights at the peak without checkpointing
            if not ckpt:
                assert m.weight_copy_bytes == pytest.approx(632e6 * 2, rel=0.1)
