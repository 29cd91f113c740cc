"""Orbax checkpoints of a train state (any pytree of arrays) plus JSON metadata.

    ckpt = Checkpointer("runs/dpo/checkpoints", max_to_keep=3)
    for step in range(1, num_steps + 1):
        state, metrics = train_step(state, next(loader))
        if step % 500 == 0:
            ckpt.save(step, state, metadata={"loader": loader.state(), "model_config": config_dict})
    ckpt.save(num_steps, state, metadata=...)      # the final state (skipped if already saved)
    ckpt.close()                                   # waits for the last background save

    state, metadata = ckpt.restore(abstract_state, config=config_dict)   # latest intact step

Layout: `<directory>/<step>/state` (arrays, OCDBT/TensorStore), `<directory>/<step>/metadata`
(JSON) and `<directory>/<step>/fingerprint` (JSON, see below). Nothing is pickled.

**Saves are asynchronous**: `save` returns once the arrays are copied to host memory (so the
next step may donate them) and Orbax writes in a background thread; the next `save`,
`wait_until_finished`, `restore` or `close` waits for it.

**A checkpoint is complete or ignored.** Each step is written into
`<step>.orbax-checkpoint-tmp*` and renamed when complete, so a process killed mid-save (even
with SIGKILL) leaves the earlier checkpoints intact; `latest_step()` never sees a partial
directory, and leftovers are deleted (in the background, finished before its first save) when
the next `Checkpointer` opens it.

**A damaged checkpoint is detected and skipped.** Every save records a fingerprint of each
array (two sums over its bits, computed on device: :func:`tree_fingerprint`), because
TensorStore notices a truncated file but restores overwritten bytes silently as other numbers.
`restore()` of the latest step checks it after reading; a step that cannot be read or does not
match is renamed `<step>.corrupt`, reported (one sentence naming the step, the path and the
cause) and the previous step is restored instead.

**A failed write names its path.** A full disk ends a save in :class:`CheckpointWriteError`
(an `OSError` whose `filename` is the step directory and whose message names the intact
checkpoints), not in Orbax's TensorStore traceback.

Restoring checks what it can before reading arrays: the stored model config against the
current one (`CheckpointMismatchError: checkpoint was written with d_model=256 but the model has
d_model=128`), then every array path and shape against the restore target.
"""

from jaxalign.checkpoint._checkpointer import Checkpointer
from jaxalign.checkpoint._errors import (
    CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError, config_mismatches,
    os_error_of,
)
from jaxalign.checkpoint._fingerprint import tree_fingerprint

__all__ = ["CheckpointCorruptError", "CheckpointMismatchError", "CheckpointWriteError",
           "Checkpointer", "config_mismatches", "os_error_of", "tree_fingerprint"]
