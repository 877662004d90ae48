from mmlora import cache


def test_cached_dir_builds_once_and_rebuilds_when_params_change(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLORA_CACHE", str(tmp_path))
    calls = []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text(str(len(calls)))

    a = cache.cached_dir("thing", {"n": 1}, ["cache.py"], build)
    b = cache.cached_dir("thing", {"n": 1}, ["cache.py"], build)
    c = cache.cached_dir("thing", {"n": 2}, ["cache.py"], build)
    assert a == b != c and len(calls) == 2
    assert (a / "x.txt").read_text() == "1" and (c / "x.txt").read_text() == "2"
    assert not list(tmp_path.glob(".*tmp*"))  # temporary build folders were renamed into place


def test_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLORA_CACHE", str(tmp_path))

    def broken(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("boom")

    try:
        cache.cached_dir("thing", {"n": 3}, ["cache.py"], broken)
    except RuntimeError:
        pass
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("thing-") and not p.name.endswith(".lock")]


def test_key_depends_on_source(monkeypatch):
    k1 = cache.cache_key({"a": 1}, ["cache.py"])
    k2 = cache.cache_key({"a": 1}, ["errors.py"])
    assert k1 != k2
