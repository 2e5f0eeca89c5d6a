"""Suite files into points: read and validate a TOML suite (every kind), expand it, name layer shapes and models."""
