"""The one door to Kaggle: the competition's name, its credentials, an authenticated API client.

Downloading the data (``prepare_data.py --download``) and submitting (``predict.py --submit``)
both need an account whose token is in ``~/.kaggle/kaggle.json`` (or ``KAGGLE_USERNAME`` and
``KAGGLE_KEY``) and the competition's rules accepted on kaggle.com. Without them, or without the
internet, they stop with a message that says what is missing and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

COMPETITION = "rsna-intracranial-hemorrhage-detection"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
TOKEN_URL = "https://www.kaggle.com/settings/api"
TOKEN_FILES = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")


class KaggleAccessError(RuntimeError):
    """Kaggle cannot be reached with what this machine has; the message says what to do."""


def credentials_hint() -> str | None:
    """None when Kaggle credentials are configured, else a message saying what is missing and what to do."""
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return None
    home = Path(os.path.expanduser("~"))
    config_dirs = [Path(os.environ["KAGGLE_CONFIG_DIR"])] if os.environ.get("KAGGLE_CONFIG_DIR") else []
    config_dirs += [home / ".kaggle", Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    if any((folder / name).is_file() for folder in config_dirs for name in TOKEN_FILES):
        return None
    return (
        "Kaggle needs credentials and none were found.\n"
        f"  Looked for: KAGGLE_USERNAME + KAGGLE_KEY or KAGGLE_API_TOKEN in the environment, and "
        f"{', '.join(TOKEN_FILES)} in {', '.join(str(d) for d in config_dirs)}.\n"
        f"  To fix: create an API token at {TOKEN_URL} and save it as "
        f"{home / '.kaggle' / 'kaggle.json'} (chmod 600), or export KAGGLE_USERNAME and KAGGLE_KEY.\n"
        f"  Then accept the competition rules at {RULES_URL} (downloads and submissions are refused until you do)."
    )


def kaggle_api():
    """An authenticated ``KaggleApi``; raises ``KaggleAccessError`` saying what is missing."""
    hint = credentials_hint()
    if hint:
        raise KaggleAccessError(hint)
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    try:
        api.authenticate()
    except (Exception, SystemExit) as error:
        raise KaggleAccessError(f"Kaggle refused the credentials found ({error}); check them at {TOKEN_URL}") from None
    return api


def network_hint(action: str, error: Exception) -> str:
    """What to do when a Kaggle request fails after authentication."""
    return (
        f"Kaggle {action} failed ({type(error).__name__}: {error}).\n"
        f"  No network: run where kaggle.com is reachable. HTTP 403: accept the rules at {RULES_URL}. "
        "HTTP 401: renew the API token."
    )
