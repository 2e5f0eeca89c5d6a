"""The readers: report, figures, the regression gate and tables, from result files only (no torch, no falqon_core)."""
