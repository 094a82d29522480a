"""The paper's numbers beside which ``supsup report`` draws a run, by preset.

Accuracies as fractions against the number of tasks learned. The MNIST curves were read off the paper's figures
by eye (about ±0.002); the SplitImageNet and SplitCIFAR100 values are printed in the paper's text and tables.
Presets whose numbers the paper does not give (or that were not retrievable: appendix H) have none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    label: str
    tasks: tuple[int, ...]
    accuracy: tuple[float, ...]


_250 = (10, 50, 100, 150, 200, 250)
_FC_H = Curve("paper: SupSup GNu, H (Fig. 3 right)", _250, (0.963, 0.962, 0.961, 0.959, 0.959, 0.957))
_FC_G = Curve("paper: SupSup GNu, G (Fig. 3 right)", _250, (0.963, 0.962, 0.961, 0.960, 0.960, 0.959))
_FC_UPPER = Curve("paper: Upper Bound (Fig. 3 right)", _250, (0.967, 0.967, 0.967, 0.967, 0.966, 0.966))
_FC_BATCHE = Curve("paper: BatchE GG (Fig. 3 right)", _250, (0.928, 0.924, 0.924, 0.923, 0.923, 0.923))
_LENET = Curve("paper: SupSup GNu, H ≈ G (Fig. 3 left)", _250, (0.937, 0.937, 0.937, 0.936, 0.936, 0.936))
_LENET_UPPER = Curve("paper: Upper Bound (Fig. 3 left)", _250, (0.949, 0.950, 0.950, 0.949, 0.949, 0.949))
_LENET_BATCHE = Curve("paper: BatchE GG (Fig. 3 left)", _250, (0.888, 0.883, 0.882, 0.882, 0.882, 0.882))
_2500 = Curve("paper: SupSup GNu, H (Fig. 4)", (10, 500, 1000, 1500, 2000, 2500),
              (0.9355, 0.935, 0.9345, 0.9345, 0.9345, 0.9345))
_NNS = Curve("paper: SupSup NNs, H (Fig. 4)", (10, 2000, 2500), (0.936, 0.9345, 0.925))
_IMAGENET = Curve("paper: SupSup GG, ER m = 8 (Fig. 2 left)", (100,), (0.8868,))
_IMAGENET_UPPER = Curve("paper: Upper Bound (Fig. 2 left)", (100,), (0.9255,))
_IMAGENET_BATCHE = Curve("paper: BatchE GG (Fig. 2 left)", (100,), (0.8150,))
_CIFAR_LOWER = Curve("paper: Lower Bound (§4.1)", (20,), (0.245,))

CURVES: dict[str, tuple[Curve, ...]] = {
    "demo": (_LENET, _LENET_UPPER),
    "permuted-mnist": (_FC_H, _FC_UPPER, _FC_BATCHE),
    "permuted-mnist-g": (_FC_G, _FC_UPPER, _FC_BATCHE),
    "permuted-mnist-lenet": (_LENET, _LENET_UPPER, _LENET_BATCHE),
    "permuted-mnist-lenet-g": (_LENET, _LENET_UPPER, _LENET_BATCHE),
    "permuted-mnist-2500": (_2500,),
    "nns-permuted-mnist": (_NNS,),
    "split-imagenet": (_IMAGENET, _IMAGENET_UPPER),
    "split-imagenet-batche": (_IMAGENET_BATCHE, _IMAGENET_UPPER),
    "split-cifar100-lower-bound": (_CIFAR_LOWER,),
}
