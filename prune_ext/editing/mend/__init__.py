"""MEND (Mitchell et al., ICLR 2022): trained editor networks turn a fine-tuning gradient into an edit.

* :mod:`.network` — the editor networks (one per matrix shape) and the learned step sizes;
* :mod:`.grads` — the gradient factors (u_t, δ_t) of the edit loss, the low-rank edited forward pass;
* :mod:`.editor` — :class:`Mend`, the editor registered as ``"mend"``, and its hyper-parameters;
* :mod:`.train` — offline training (``prune-ext train-mend``).
"""

from .editor import PACKAGED_WEIGHTS, Mend, MendHyperParams
from .network import GradientEditor, MendNetConfig, MendNetworks
from .train import MendTrainConfig, train_mend

__all__ = [
    "PACKAGED_WEIGHTS",
    "GradientEditor",
    "Mend",
    "MendHyperParams",
    "MendNetConfig",
    "MendNetworks",
    "MendTrainConfig",
    "train_mend",
]
