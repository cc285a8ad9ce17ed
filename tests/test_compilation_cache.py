"""Where the persistent compilation cache goes (the command line's use of it: tests/test_cli.py)."""

import os

import ml_collections
import pytest

from wmdd_jax.compilation_cache import cache_dir, use_compilation_cache
from wmdd_jax.errors import UserError


def section(where: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(dir=where, min_compile_secs=0.2, max_size_mb=2048))


def test_the_cache_folder_follows_jax_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(section("auto")) == str(tmp_path / "jax")  # the caller's JAX setting wins
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert cache_dir(section("auto")) == str(tmp_path / "xdg" / "wmdd_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir(section("auto")) == str(tmp_path / "home" / ".cache" / "wmdd_jax" / "xla")
    assert cache_dir(section("~/elsewhere")) == str(tmp_path / "home" / "elsewhere")
    assert cache_dir(section("")) is None


def test_a_folder_that_cannot_be_made_is_a_user_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"cannot create --config.compilation_cache.dir=.*a_file.*or '' to compile"):
        use_compilation_cache(section(str(tmp_path / "a_file" / "xla")))
    assert not os.path.exists(tmp_path / "a_file" / "xla")
