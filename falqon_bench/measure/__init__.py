"""The measuring side: runs points on the machine being measured (imports torch and falqon_core)."""
