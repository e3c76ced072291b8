"""Interoperability with PyTorch: the released WSL / SWSL ResNeXt weights in, tagjax trunks out.

* :mod:`tagjax.interop.torchvision`: ``tagjax import-weights`` / ``export-weights``; the torchvision key
  layout and its mapping onto tagjax's parameter tree.
* :mod:`tagjax.interop.reference_numpy`: an independent NumPy forward pass of torchvision's ResNet / ResNeXt,
  the reference the parity tests compare the converted Flax model against (no PyTorch needed).
"""
