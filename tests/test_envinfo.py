

def test_falqon_git_sha_overrides_a_possibly_stale_git_checkout(monkeypatch):
    from falqon_bench.measure.envinfo import git_info

    monkeypatch.setenv("FALQON_GIT_SHA", "3a7b71d0123")
    assert git_info() == {"sha": "3a7b71d0123", "dirty": None, "source": "FALQON_GIT_SHA"}
    monkeypatch.delenv("FALQON_GIT_SHA")
    assert git_info().get("source") is None
