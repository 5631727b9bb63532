"""The one learning-rate schedule of the distiller, the teachers and the grounding trainer."""
import math

import pytest

from distill.train.schedule import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    assert [warmup_cosine(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 100, 4) == 1.0
    assert warmup_cosine(52, 100, 4, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 4, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 4) == pytest.approx(0.0)          # past the end: stays at the floor
    assert warmup_cosine(70, 100, 4, constant=True) == 1.0
    assert warmup_cosine(0, 10, 0) == 1.0 and math.isclose(warmup_cosine(5, 10, 0), 0.5)
