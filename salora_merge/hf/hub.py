"""Where salora-merge talks to the Hub (with huggingface_hub): downloading repos, uploading folders."""

from __future__ import annotations

import os
import re
from pathlib import Path

from salora_merge.errors import InputError, ModelResolutionError

__all__ = ["is_repo_id", "parse_repo_ref", "download_snapshot", "hf_home", "saved_token", "upload_folder"]

_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@(?P<rev>[\w.\-/]+))?$")

# What salora-merge needs of a model or adapter repo: configs, weights, tokenizer, cards.
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.md", "tokenizer*"]


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")


def is_repo_id(text: str) -> bool:
    """``org/name`` as the Hub spells repo ids (no revision)."""
    return bool(_REPO_ID.match(text))


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


_TRANSPORT_MODULES = {"httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3"}


def saved_token() -> str | None:
    """``HF_TOKEN``, else the token of the user's saved login (``hf auth login``); never logged."""
    from huggingface_hub import get_token

    return get_token()


def _http_status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def upload_folder(
    folder: Path,
    repo_id: str,
    token: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str,
    endpoint: str | None = None,
    rerun: str,
) -> tuple[str, str | None]:
    """Create the repo (if needed) and the branch, then commit every file of ``folder`` in one commit.

    Returns ``(commit_url, pr_url)``. Every failure becomes one line that says what to do, ending with
    the command to re-run (``rerun``); the token never appears in a message.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    step = "creating the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and not create_pr:
            step = f"creating branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision,
            create_pr=create_pr, ignore_patterns=[".*", "**/.*"],
        )
    except ValueError as exc:  # raised by the client when the Hub rejects the card's metadata
        if "metadata" in str(exc).lower():
            detail = " ".join(line.strip("- ") for line in str(exc).splitlines()[1:] if line.strip())
            raise InputError(f"{folder}/README.md: the Hub rejected the card's metadata ({detail}); "
                             f"fix it, then re-run: {rerun}") from None
        raise InputError(f"push to {repo_id} failed while {step} ({exc}); re-run: {rerun}") from None
    except RevisionNotFoundError:
        raise InputError(f"push to {repo_id}: revision {revision} not found; re-run: {rerun}") from None
    except HfHubHTTPError as exc:
        status = _http_status(exc)
        if status == 401 and not isinstance(exc, RepositoryNotFoundError):
            raise InputError(
                f"{where} rejected the token (HTTP 401) while {step}; set HF_TOKEN to a valid token with write "
                f"access (or run `hf auth login`), then re-run: {rerun}"
            ) from None
        if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
            raise InputError(
                f"{where}: the token may not write to {repo_id} (HTTP {status}) while {step}; use a token with "
                f"write access to that namespace, then re-run: {rerun}"
            ) from None
        raise InputError(f"push to {repo_id} failed while {step} (HTTP {status}); nothing was committed; "
                         f"re-run: {rerun}") from None
    except Exception as exc:  # connection failures surface as the HTTP library's own exception types
        if not (isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES):
            raise
        raise InputError(f"push to {repo_id}: cannot reach {where} ({exc.__class__.__name__}) while {step}; "
                         f"nothing was committed; re-run: {rerun}") from None
    return str(info.commit_url if hasattr(info, "commit_url") else info), getattr(info, "pr_url", None)
