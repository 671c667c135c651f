"""What the studio's commands leave on the console: diffusers' and transformers' chatter, turned off once."""

from __future__ import annotations

import functools


@functools.cache
def quiet_libraries() -> None:
    """Loading bars, info logs and deprecation notes of the libraries are not for the user of the CLI or
    the server's console. Once a process (it imports diffusers and transformers: call it before a job)."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
