"""The test suite's config: `tiny`'s path end to end at the smallest useful scale (< 2 min)."""
from dataclasses import replace

from guie.configs.tiny import CONFIG as _tiny

_stage1, _stage2 = _tiny.stages

CONFIG = replace(
    _tiny,
    name="smoke",
    data=replace(_tiny.data, root="build/sample-data-smoke", sample_instances=120, sample_views=4,
                 heldout_classes=40, distractor_classes=10, distractors_per_class=2,
                 num_workers=0),
    stages=(replace(_stage1, epochs=4, cache_views=2, eval_every_epochs=2),
            replace(_stage2, epochs=1, eval_every_epochs=1)),
)
