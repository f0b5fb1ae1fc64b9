"""The Determined callback for the Hugging Face Trainer that this package ships.

Kept at the top level, where the reference had it, so `from hf_callback import DetCallback` keeps
working; the implementation lives in swallow_ft/det_callback.py.
"""

from swallow_ft.det_callback import DetCallback

__all__ = ["DetCallback"]
