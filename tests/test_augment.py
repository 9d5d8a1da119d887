"""Training augmentation makes another plausible source image, repeatably, and goes through the one
preprocessing function."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import MINI
from pneumoflag.convert.augment import AUGMENTATIONS, make_augmenter
from pneumoflag.device.preprocess import PreprocessSpec, decode, prepare

SPEC = PreprocessSpec(64, 64, 1)
GRAY = decode(sorted((MINI / "NORMAL").glob("*.jpeg"))[0], PreprocessSpec(224, 224, 1))


@pytest.mark.parametrize("profile", AUGMENTATIONS)
def test_each_profile_is_repeatable_and_yields_a_decodable_image(profile):
    aug = make_augmenter(profile, SPEC.height)
    a = aug(GRAY, np.random.default_rng([1, 2, 3]))
    b = aug(GRAY, np.random.default_rng([1, 2, 3]))
    assert a.dtype == np.uint8 and a.ndim == 2 and np.array_equal(a, b)  # seeded: the same every time
    assert min(a.shape) >= SPEC.height  # never smaller than the model's input
    assert prepare(a, SPEC).shape == SPEC.shape
    if profile == "none":
        assert a is GRAY
    else:
        others = [aug(GRAY, np.random.default_rng(k)) for k in range(8)]
        assert any(not np.array_equal(o, GRAY) for o in others) and len({o.tobytes() for o in others}) > 1


def test_export_changes_grey_levels_and_resampling_not_the_anatomy():
    """The export profile's images stay close to the source after equalisation (the same radiograph)."""
    aug_export, aug_scanner = make_augmenter("export", 64), make_augmenter("scanner", 64)
    ref = prepare(GRAY, SPEC).astype(float).ravel()
    corr = {name: np.mean([np.corrcoef(ref, prepare(aug(GRAY, np.random.default_rng(k)), SPEC).astype(float).ravel())[0, 1]
                           for k in range(20)]) for name, aug in (("export", aug_export), ("scanner", aug_scanner))}
    assert corr["export"] > 0.6 and corr["export"] > corr["scanner"]
