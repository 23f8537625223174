"""What the Ray pool and the Ray jobs client share, without importing Ray: the auth mode, set before Ray's
first import, and the environment passed on to the processes Ray starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# passed to every actor and job, so that a worker on another node (or a raylet started before them) sees the
# driver's choices; HF_*_OFFLINE in particular: no network at run time
ENV_PASSED = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
              "HF_DATASETS_CACHE", "TOKENIZERS_PARALLELISM")


def set_auth_mode() -> None:
    """`ray start` and a local ray.init turn token auth on and write ~/.ray/auth_token; Ray's clients read the
    mode when Ray is imported, so a job client of such a cluster needs it set before the import. Once Ray is
    imported the mode is fixed: setting it then would only reach the processes Ray starts, and they would
    disagree."""
    if ("ray" not in sys.modules and "RAY_AUTH_MODE" not in os.environ
            and (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
