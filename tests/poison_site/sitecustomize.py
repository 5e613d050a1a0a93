"""Test-only: put this folder on a Ray cluster's PYTHONPATH and every worker process kills itself
while decoding a PNG that carries a ``poison`` text chunk: an image that crashes its worker every
time, as a decoder bug would. Production code has no hook for this; see test_label.py."""

import os

from PIL import PngImagePlugin

_open = PngImagePlugin.PngImageFile._open


def _poisoned_open(self):
    _open(self)
    if self.info.get("poison"):
        os._exit(3)


PngImagePlugin.PngImageFile._open = _poisoned_open
