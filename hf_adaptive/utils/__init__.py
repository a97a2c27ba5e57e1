"""Small shared helpers: atomic files and tensor+JSON state."""

from .io import atomic_write_json, atomic_write_text, load_state, save_state

__all__ = ["atomic_write_json", "atomic_write_text", "load_state", "save_state"]
