"""Probe a local audio file (duration, type, size) before it is uploaded, using mutagen.

Knowing the duration lets the producer check ``continueAt`` and the 8-minute limit before any
byte leaves the machine (KIE's rules for the source audio).
"""

from __future__ import annotations

import math
import mimetypes
import os
import stat
from dataclasses import dataclass

import mutagen

from kie_extend.errors import ValidationError

#: Field name under which problems with a local audio file are reported.
AUDIO_FILE_FIELD = "audio_file"


@dataclass(frozen=True)
class AudioInfo:
    """What a probe learned about a local audio file."""

    duration: float
    mime: str
    size: int


def _invalid(message: str) -> ValidationError:
    return ValidationError([{"field": AUDIO_FILE_FIELD, "message": message}])


def probe_audio(path: str | os.PathLike[str]) -> AudioInfo:
    """Duration, MIME type and size of the audio file at ``path``; ValidationError if it is not usable audio."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise _invalid(f"{name}: no such file") from None
    except OSError as exc:
        raise _invalid(f"{name}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _invalid(f"{name}: is not a regular file")
    if st.st_size == 0:
        raise _invalid(f"{name}: is empty (0 bytes)")
    try:
        audio = mutagen.File(name)
    except mutagen.MutagenError as exc:
        # mutagen wraps OSError (permissions, races) in MutagenError; name the cause either way.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise _invalid(f"{name}: cannot be read ({cause.strerror or type(cause).__name__})") from None
        raise _invalid(f"{name}: is not an audio file that can be read ({exc})") from None
    if audio is None or getattr(audio, "info", None) is None:
        raise _invalid(f"{name}: is not a recognised audio file (MP3, WAV, FLAC, Ogg, M4A, ...)")
    duration = getattr(audio.info, "length", None)
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise _invalid(f"{name}: has no audio (duration {duration or 0:g} s)")
    return AudioInfo(duration=float(duration), mime=_mime(name, audio.mime), size=st.st_size)


def _mime(name: str, candidates: list[str]) -> str:
    """The file's MIME type: the extension's guess if the content agrees, else mutagen's first."""
    guessed = mimetypes.guess_type(name)[0]
    if guessed and guessed in candidates:
        return guessed
    audio = [m for m in candidates if m.startswith("audio/")]
    return audio[0] if audio else "application/octet-stream"
