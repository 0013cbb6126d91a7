"""The fused ops' sources are part of torch.compile's cache keys."""

import torch

from coda_titan.kernels import COMPILE_CACHE_TAG, compile_cache_tag


def test_importing_the_ops_tags_torch_compile_caches_with_their_sources():
    tags = torch.compiler.config.cache_key_tag.split("+")
    assert COMPILE_CACHE_TAG in tags
    assert tags.count(COMPILE_CACHE_TAG) == 1


def test_the_tag_changes_with_any_source_and_only_with_them(tmp_path):
    (tmp_path / "cutedsl").mkdir()
    (tmp_path / "op.py").write_text("def backward(): return 1\n")
    (tmp_path / "cutedsl" / "kernel.py").write_text("FAKE = (1, 2)\n")
    (tmp_path / "notes.txt").write_text("not a source")
    tag = compile_cache_tag(tmp_path)
    assert compile_cache_tag(tmp_path) == tag
    (tmp_path / "notes.txt").write_text("still not a source")
    assert compile_cache_tag(tmp_path) == tag
    (tmp_path / "cutedsl" / "kernel.py").write_text("FAKE = (1, 3)\n")
    edited = compile_cache_tag(tmp_path)
    assert edited != tag
    (tmp_path / "cutedsl" / "kernel.py").rename(tmp_path / "cutedsl" / "moved.py")
    assert compile_cache_tag(tmp_path) != edited
