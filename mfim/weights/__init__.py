"""StyleGAN2 weight files: load official weights safely, save and load our own format, write official layouts.

Formats, detected from the file's content (not its name) by :func:`read_checkpoint`, one module each:

* ``mfim``       -- ours (mfim_format.py): a ``torch.save`` zip with the config stored next to the weights.
* ``nvidia``     -- stylegan2-ada-pytorch / stylegan3 network pickles (nvidia.py reads them as data through a
  restricted unpickler, never running the code they carry; tests/nvidia_writer.py writes them for the tests).
* ``rosinality`` -- rosinality/stylegan2-pytorch ``.pt`` (rosinality.py reads and writes them).

Whatever the format, the network config -- stored in the file or inferred from its key names -- goes through the
one set of bounds in limits.py before anything is allocated (common.build_network). The official layouts store the
weights in the orientation our layers use, so conversion is renaming and reshaping only: a loaded generator
reproduces the reference image (see tests/test_checkpoints.py and the parity numbers in the models report).
``write_rosinality_checkpoint`` (beside its reader, rosinality.py) and ``tests/nvidia_writer.py``
(only the tests write NVIDIA pickles) produce those layouts from our networks (key names, shapes, pickle structure as
in the official files) so the loaders can be tested without the real files.
"""

from mfim.weights.limits import CheckpointError
from mfim.weights.loading import (
    ASSET_NAME,
    RawCheckpoint,
    checkpoint_format,
    load_discriminator,
    load_generator,
    read_checkpoint,
)
from mfim.weights.mfim_format import FORMAT, checkpoint_dict, save_checkpoint
from mfim.weights.nvidia import PersistentRecord, nvidia_discriminator_keys, nvidia_generator_keys
from mfim.weights.rosinality import (
    rosinality_discriminator_keys,
    rosinality_generator_keys,
    write_rosinality_checkpoint,
)

__all__ = [
    "ASSET_NAME",
    "FORMAT",
    "CheckpointError",
    "PersistentRecord",
    "RawCheckpoint",
    "save_checkpoint",
    "checkpoint_dict",
    "read_checkpoint",
    "checkpoint_format",
    "load_generator",
    "load_discriminator",
    "write_rosinality_checkpoint",
    "nvidia_generator_keys",
    "nvidia_discriminator_keys",
    "rosinality_generator_keys",
    "rosinality_discriminator_keys",
]
