"""quiet() drops Lightning's 'could not find the monitored key' warning only while no validation
metric exists yet (a short or resumed fit saving before its first validation, issue 33); a monitor
that names no logged metric, with validation metrics there, still warns."""

from __future__ import annotations

import warnings

from visiontl.core.quiet import quiet

BEFORE_VALIDATION = ("`ModelCheckpoint(monitor='val_acc')` could not find the monitored key in the returned metrics: "
                     "['trainable_params', 'train_acc', 'train_loss_epoch', 'epoch', 'step']. HINT: Did you call "
                     "`log('val_acc', value)` in the `LightningModule`?")
MISSPELLED = ("`ModelCheckpoint(monitor='val_accuracy')` could not find the monitored key in the returned metrics: "
              "['val_acc', 'val_loss', 'train_acc', 'epoch', 'step']. HINT: Did you call `log('val_accuracy', value)` "
              "in the `LightningModule`?")


def test_only_the_notice_before_the_first_validation_is_dropped() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet(verbose=False):
            warnings.warn(BEFORE_VALIDATION, UserWarning, stacklevel=1)
            warnings.warn(MISSPELLED, UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [MISSPELLED]
