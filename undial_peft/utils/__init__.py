"""Small helpers shared by every room: atomic storage, text tables, model modes, versions."""
