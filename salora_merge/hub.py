"""The only module that imports huggingface_hub: turning Hub repo ids into local folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelResolutionError

__all__ = ["parse_repo_ref", "download_snapshot", "hf_home"]

_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")

# What salora-merge needs of a model or adapter repo: configs, weights, tokenizer, cards.
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md", "tokenizer*"]


def parse_repo_ref(ref: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; ``None`` if ``ref`` is not a repo id."""
    match = _REPO_REF.match(ref)
    if not match:
        return None
    return match["repo"], match["rev"]


def hf_home() -> Path:
    """``$HF_HOME`` or ``~/.cache/huggingface``, as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HOME") or constants.HF_HOME)


def download_snapshot(repo_id: str, revision: str | None, what: str) -> Path:
    """Download (or reuse from the Hub cache) the files salora-merge needs from a repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=_ALLOW))
    except RevisionNotFoundError:
        raise ModelResolutionError(f"{what} {label}: revision not found on the Hub") from None
    except GatedRepoError:
        raise ModelResolutionError(
            f"{what} {label}: the repo is gated; accept its terms on the Hub and log in (HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelResolutionError(
            f"{what} {label}: not a local folder and not found on the Hub (private repos need HF_TOKEN)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelResolutionError(
            f"{what} {label}: not a local folder, not in the Hub cache, and the Hub cannot be reached "
            "(offline?); pass a local folder"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelResolutionError(f"{what} {label}: Hub request failed ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise ModelResolutionError(
            f"{what} {label}: could not download ({exc.__class__.__name__}); pass a local folder"
        ) from None
