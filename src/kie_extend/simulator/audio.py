"""Small real media files: silent CBR MP3 generation, MP3/WAV duration reading, a tiny PNG."""

from __future__ import annotations

import functools
import io
import struct
import wave
import zlib

# MPEG-1 Layer III, 32 kbit/s, 48 kHz, mono, no CRC: 96-byte frames of 1152 samples (24 ms).
MP3_SAMPLE_RATE = 48000
MP3_SAMPLES_PER_FRAME = 1152
_HEADER = bytes([0xFF, 0xFB, 0x14, 0xC0])
_FRAME_BYTES = 96
_SIDE_INFO_BYTES = 17  # mono MPEG-1; all zero = no main data, i.e. silence
_PAYLOAD_BYTES = _FRAME_BYTES - len(_HEADER) - _SIDE_INFO_BYTES


@functools.lru_cache(maxsize=128)
def mp3_bytes(seconds: float, tag: bytes = b"") -> bytes:
    """Return a valid silent MP3 (MPEG-1 Layer III CBR) of `seconds`; `tag` goes into ancillary data."""
    frames = max(1, round(seconds * MP3_SAMPLE_RATE / MP3_SAMPLES_PER_FRAME))
    silent = _HEADER + bytes(_SIDE_INFO_BYTES) + bytes(_PAYLOAD_BYTES)
    first = _HEADER + bytes(_SIDE_INFO_BYTES) + tag[:_PAYLOAD_BYTES].ljust(_PAYLOAD_BYTES, b"\0")
    return first + silent * (frames - 1)


def mp3_seconds_of(frames: int) -> float:
    """Duration in seconds of `frames` frames as written by `mp3_bytes`."""
    return frames * MP3_SAMPLES_PER_FRAME / MP3_SAMPLE_RATE


_BITRATES = {
    (1, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (1, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (1, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (2, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (2, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (2, 3): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {1: (44100, 48000, 32000), 2: (22050, 24000, 16000), 25: (11025, 12000, 8000)}


def _frame_info(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(frame length, samples, sample rate) of an MPEG audio frame header at `pos`, or None."""
    if pos + 4 > len(data) or data[pos] != 0xFF or (data[pos + 1] & 0xE0) != 0xE0:
        return None
    b1, b2 = data[pos + 1], data[pos + 2]
    version = {0: 25, 2: 2, 3: 1}.get((b1 >> 3) & 3)
    layer = {1: 3, 2: 2, 3: 1}.get((b1 >> 1) & 3)
    br_index, sr_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version is None or layer is None or br_index in (0, 15) or sr_index == 3:
        return None
    bitrate = _BITRATES[(1 if version == 1 else 2, layer)][br_index] * 1000
    rate = _RATES[version][sr_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384, rate
    if layer == 3 and version != 1:
        return 72 * bitrate // rate + padding, 576, rate
    return 144 * bitrate // rate + padding, 1152, rate


def mp3_duration(data: bytes) -> float | None:
    """Duration in seconds of an MP3 by walking its frames (skips an ID3v2 tag); None if not MP3."""
    pos = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        pos = 10 + size + (10 if data[5] & 0x10 else 0)
    seconds, frames = 0.0, 0
    while True:
        info = _frame_info(data, pos)
        if info is None or info[0] <= 0:
            break
        length, samples, rate = info
        if pos + length > len(data) and frames > 0:
            break
        seconds += samples / rate
        frames += 1
        pos += length
    return seconds if frames >= 2 or (frames == 1 and pos >= len(data)) else None


def wav_duration(data: bytes) -> float | None:
    """Duration in seconds of a PCM WAV file, or None."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate = w.getframerate()
            return w.getnframes() / rate if rate else None
    except (wave.Error, EOFError, struct.error):
        return None


def audio_duration(data: bytes) -> float | None:
    """Duration of WAV or MP3 bytes when readable, else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return wav_duration(data)
    return mp3_duration(data)


def wav_bytes(seconds: float, rate: int = 8000) -> bytes:
    """Return a silent 8-bit mono PCM WAV of `seconds` (handy for upload tests)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(b"\x80" * int(seconds * rate))
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=1)
def png_bytes() -> bytes:
    """Return a valid 1x1 PNG used as cover image."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x30\x60\x90")
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
