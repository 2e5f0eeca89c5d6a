"""The stored data: the results row, run directories on disk, and pure functions of stored fields (no torch)."""
