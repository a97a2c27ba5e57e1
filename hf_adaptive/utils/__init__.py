"""Small shared helpers: atomic files and tensor+JSON state, validation, options (imported on first use, so that
the light modules here, `validation` and `options`, do not pull in torch)."""

from __future__ import annotations

from .lazy import lazy_exports

_EXPORTS = {
    "atomic_write_json": "hf_adaptive.utils.io",
    "atomic_write_text": "hf_adaptive.utils.io",
    "load_state": "hf_adaptive.utils.io",
    "save_state": "hf_adaptive.utils.io",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
