"""Opening an untrusted media file: real containers only, plain files only, limits read from the header.

FFmpeg's probing picks whatever demuxer scores best, and several of them are
not media files but instructions: a `concat` script (which opens and decodes
the files it names, itself included), an HLS/M3U playlist (which opens URLs),
an image sequence. Every open here sets the AVFormatContext options that
FFmpeg itself enforces in `avformat_open_input`, after probing and before the
demuxer reads anything:

- `format_whitelist`: only the demuxers in ALLOWED_FORMATS; anything else
  fails with EINVAL ("Format not on whitelist") before its header is read;
- `protocol_whitelist=file`: the path is opened as a plain file, and no
  nested open (a demuxer reaching for another file or a URL) can use any
  other protocol;
- `max_streams`: a header cannot ask for thousands of streams.

Each file is opened twice. First for its header alone, with every decoder
refused (`codec_whitelist` matching none), so `avformat_find_stream_info`
cannot decode a frame to learn what the header did not say: a 12000x12000 PNG
frame is refused from its stream header before anything is allocated for it.
Then for decoding, with `max_pixels` passed to the decoders that stream-info
probing opens; the decode loops pass it to their own decoder as well
(`decoder_options`), so a frame bigger than its header said fails in the
decoder's `get_buffer`, before its buffer exists. The open is also
interrupted by FFmpeg (PyAV's open timeout, checked in FFmpeg's I/O and
stream-info loops) when the file's wall-time budget runs out.
"""

from __future__ import annotations

import os
import stat

import av
import av.logging

from edgefed.edge.media.errors import MediaError, ffmpeg_reason
from edgefed.edge.media.limits import MediaBudget

# FFmpeg demuxer names. "mov" is FFmpeg's mov,mp4,m4a,3gp,3g2,mj2 demuxer and "matroska" its
# matroska,webm one; FFmpeg matches a demuxer when any of its names is listed.
ALLOWED_FORMATS = ("mov", "matroska", "avi", "mpegts", "mpeg", "wav", "flac", "mp3", "ogg", "aac")
MAX_STREAMS = 64

SAFE_OPEN_OPTIONS = {
    "format_whitelist": ",".join(ALLOWED_FORMATS),
    "protocol_whitelist": "file",
    "max_streams": str(MAX_STREAMS),
}
# The header pass: no decoder may open, and stream-info probing reads no further than it must.
HEADER_ONLY_OPTIONS = {**SAFE_OPEN_OPTIONS, "codec_whitelist": "-", "probesize": "32", "analyzeduration": "1"}


def decoder_options(budget: MediaBudget) -> dict[str, str]:
    """Options for a decoder of this file (PyAV `codec_context.options`, set before the first decode)."""
    return {"max_pixels": str(budget.limits.max_media_pixels)}


def open_container(path: str, budget: MediaBudget) -> av.container.InputContainer:
    """The file opened for decoding, once its format and stream headers are within `budget`'s limits.

    Raises MediaError (with the reason) for anything that is not a plain media file within limits.
    """
    target = _checked_file(path)
    with _open(path, target, budget, HEADER_ONLY_OPTIONS, {}) as header:
        check_header(path, header, budget)
    container = _open(path, target, budget, SAFE_OPEN_OPTIONS, decoder_options(budget))
    try:
        if not is_allowed(container.format.name):  # FFmpeg refused it already; this states the rule once more
            raise MediaError(path, f"container format {container.format.name!r} is not allowed")
        check_header(path, container, budget)  # streams that only stream-info probing found
    except MediaError:
        container.close()
        raise
    return container


def is_allowed(format_name: str) -> bool:
    return any(name in ALLOWED_FORMATS for name in format_name.split(","))


def video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """The video streams that are moving pictures (not an audio file's cover art)."""
    return [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]


def check_header(path: str, container: av.container.InputContainer, budget: MediaBudget) -> None:
    """Refuse, from what the container and stream headers say, a file past a limit (nothing is decoded)."""
    if container.duration:
        budget.check_duration(path, container.duration / 1_000_000)
    for stream in [*video_streams(container), *container.streams.audio]:
        if stream.duration and stream.time_base:
            budget.check_duration(path, float(stream.duration * stream.time_base), f"{stream.type} stream duration")
        if stream.type == "video":
            if stream.codec_context is not None:
                budget.check_pixels(path, stream.codec_context.width, stream.codec_context.height)
            if stream.frames:
                budget.check_frame_count(path, stream.frames, "video frames (stream header)")


def _checked_file(path: str) -> str:
    """The absolute path of a non-empty regular file (a FIFO or device would block or never end)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MediaError(path, "no such file") from None
    except PermissionError:
        raise MediaError(path, "permission denied") from None
    except OSError as err:
        raise MediaError(path, f"unreadable ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(path, "no such file" if stat.S_ISDIR(info.st_mode) else "not a regular file")
    if info.st_size == 0:
        raise MediaError(path, "empty file (0 bytes)")
    # An absolute path always starts with "/": FFmpeg reads it as a file name, never as "proto:...".
    return os.path.abspath(path)


def _open(path: str, target: str, budget: MediaBudget, container_options: dict[str, str],
          options: dict[str, str]) -> av.container.InputContainer:
    try:
        return av.open(target, container_options=container_options, options=options,
                       timeout=(budget.remaining_s(), None))
    except av.error.ExitError:  # the open timeout interrupted FFmpeg
        raise budget.too_slow(path) from None
    except av.error.PermissionError:
        raise MediaError(path, "permission denied") from None
    except av.error.ArgumentError as err:  # EINVAL: most often the format whitelist
        refused = refused_format(target)
        if refused is not None:
            raise MediaError(path, f"{refused!r} is not an allowed container format (FFmpeg concat scripts, "
                                   f"playlists and image sequences are refused; allowed: "
                                   f"{', '.join(ALLOWED_FORMATS)})") from None
        raise MediaError(path, f"not a media file FFmpeg can open ({ffmpeg_reason(err)})") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        raise MediaError(path, f"not a media file FFmpeg can open ({ffmpeg_reason(err)})") from None


def refused_format(target: str) -> str | None:
    """The demuxer FFmpeg probed for a file its format whitelist refused, or None if that was not the failure.

    FFmpeg says which only in its log (the log context is the demuxer), so this
    opens the file once more, refused again before any header is read, with
    PyAV's log callback on (it attaches the last error log to the exception)
    and the log itself captured for this thread, so nothing is printed.
    """
    level = av.logging.get_level()
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture():
            av.open(target, container_options=HEADER_ONLY_OPTIONS).close()
    except av.error.FFmpegError as err:
        if err.log and "not on whitelist" in err.log[2]:
            return err.log[1].strip()
    finally:
        av.logging.set_level(level)
    return None
