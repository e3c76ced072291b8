"""Test setup shared by the whole suite.

* 8 simulated CPU devices (XLA_FLAGS), set before JAX is imported anywhere, so sharding tests run a real
  data x FSDP mesh on one CPU.
* The persistent JAX compilation cache, so re-runs skip most compilation.
* absl flags marked parsed: grain's multiprocessing reads them.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

_CACHE = Path(
    os.environ.get("TAGJAX_TEST_JAX_CACHE", Path.home() / ".cache" / "tagjax" / "jax_cache_tests")
)
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def wn():
    """The process-wide WordNet 3.0 reader (prepared from Debian's wordnet-base if needed)."""
    from tagjax import wordnet

    return wordnet.load()
