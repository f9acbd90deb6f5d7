"""Which code measured a result: the sources digest is a function of the sources alone, and seed groups say when
their runs were measured by different code."""

import shutil

from cnt import provenance


def test_the_sources_digest_follows_the_sources_not_the_checkout(tmp_path):
    a, b = tmp_path / "a" / "cnt", tmp_path / "b" / "cnt"
    shutil.copytree(provenance.PACKAGE, a, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(provenance.PACKAGE, b, ignore=shutil.ignore_patterns("__pycache__"))
    assert provenance.sources_digest(a) == provenance.sources_digest(b) == provenance.code_record()["sources_sha256"]
    (b / "__pycache__").mkdir(exist_ok=True)
    (b / "__pycache__" / "stale.py").write_text("x = 1\n")  # caches are not sources
    assert provenance.sources_digest(b) == provenance.sources_digest(a)
    (b / "report.py").write_text((b / "report.py").read_text() + "\n# one more line\n")
    assert provenance.sources_digest(b) != provenance.sources_digest(a)
    (b / "report.py").rename(b / "report_renamed.py")  # same bytes under another name: other sources
    (b / "report_renamed.py").write_text((a / "report.py").read_text())
    assert provenance.sources_digest(b) != provenance.sources_digest(a)


def test_same_code():
    x, y = {"sources_sha256": "x"}, {"sources_sha256": "y"}
    assert provenance.same_code([x, dict(x)]) is True
    assert provenance.same_code([x, y]) is False
    assert provenance.same_code([x, None]) is None and provenance.same_code([x, {}]) is None
