"""Model backends: one module per model library, each a :class:`~pipeline.models.backends.base.Backend`
(torchvision's detection models, the instance-segmentation families, have their own: ``detection``).

The registry (:mod:`pipeline.models.registry`) lists the families of every backend in ``BACKENDS``;
each family's :class:`~pipeline.models.backends.base.ModelSpec` names its backend, which resolves
encoders, gives the input divisor, builds the network, names its encoder, gives the preprocessing
from the encoder's pretrained config and where its ImageNet weights download from.  Adding an
architecture of one of these libraries is a family overlay (``pipeline/configs/<name>.yaml``, and
for smp nothing else); adding a library is one module here and its line in ``BACKENDS``.
"""

from pipeline.models.backends import detection, hf, smp, torchvision
from pipeline.models.backends.base import Backend, BuildRequest, ModelSpec, SegmentationNet

# the order of list_models()
BACKENDS: tuple[Backend, ...] = (smp.BACKEND, hf.BACKEND, torchvision.BACKEND, detection.BACKEND)

__all__ = ["BACKENDS", "Backend", "BuildRequest", "ModelSpec", "SegmentationNet"]
