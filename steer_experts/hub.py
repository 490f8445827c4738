"""Transport to and from the Hugging Face Hub.

Both shareable objects (:class:`~steer_experts.ExpertSet` and a steered model)
save to a plain folder with ``save_pretrained``; this module moves such a folder
to and from the Hub, and turns the Hub's offline failures into clear errors. It
imports nothing of the pipeline, so every stage may use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import SteerExpertsError


class SavedFolderNotFoundError(SteerExpertsError, FileNotFoundError):
    """Raised when there is no saved folder at a path, or it lacks a file a save always writes."""


class HubUnavailableError(SteerExpertsError, ConnectionError):
    """Raised when a Hub operation is needed but the Hub cannot be reached."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids reaching the Hub (1, true, yes or on)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_folder(folder_or_repo: str | Path, required: Sequence[str], what: str) -> Path:
    """Return a local folder holding ``required`` files: ``folder_or_repo`` itself, or a Hub snapshot of it.

    Raises:
        FileNotFoundError: a local folder lacks a required file.
        HubUnavailableError: it is a repo id and the Hub cannot be reached (offline).
    """
    path = Path(folder_or_repo).expanduser()
    if path.is_dir():
        missing = [f for f in required if not (path / f).exists()]
        if missing:
            raise SavedFolderNotFoundError(f"{path} is not a saved {what}: missing {missing}.")
        return path
    repo_id = str(folder_or_repo)
    if path.suffix or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise SavedFolderNotFoundError(f"No {what} folder at {repo_id!r} (and it is not a Hub repo id like 'user/name').")
    if hub_offline():
        raise HubUnavailableError(
            f"{repo_id!r} is not a local folder, and HF_HUB_OFFLINE is set, so it cannot be fetched from the Hub. "
            f"Unset HF_HUB_OFFLINE when online, or pass the folder a saved {what} lives in."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(required) + ["*.json", "*.md", "*.safetensors"]))
    except Exception as err:  # the hub client raises many unrelated types for "unreachable"
        raise HubUnavailableError(f"Could not fetch {what} {repo_id!r} from the Hub: {err}") from err


def upload_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload with steer_experts") -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the repo URL.

    Raises:
        HubUnavailableError: offline, not logged in, or the upload failed.
    """
    if hub_offline():
        raise HubUnavailableError(
            "HF_HUB_OFFLINE is set, so nothing can be pushed to the Hub. Unset it, log in with "
            "`hf auth login` (or pass token=), and push again. The folder to push is unchanged: "
            f"{folder}"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message)
    except Exception as err:  # network, auth and permission errors all mean "not pushed"
        raise HubUnavailableError(f"Could not push to {repo_id!r}: {err}. Check your network and `hf auth login`.") from err
    return str(url)
