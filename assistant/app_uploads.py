"""The app's upload checks: an upload is a file in gradio's upload folder, decoded by the allowed decoders only.

Gradio hands a handler a file payload (``{"path": ..., "url": ...}``); `read_upload` accepts only a file
inside the server's own upload folder (never a URL, inline data or a path elsewhere), reads at most the
byte cap plus one, and decodes it with `assistant.imageio.image_from_upload` (format from the bytes,
pixels capped). What it refuses is an `UploadRejected` whose message the page shows as it is.
"""

from __future__ import annotations

from pathlib import Path


class UploadRejected(ValueError):
    """An upload the app will not use; `field` says which box it came from ("image" or "references")."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


def upload_path(value, cache_dir: str, field: str) -> Path:
    """The local file behind an uploaded-file payload; anything else (a URL, a path elsewhere) is refused.

    Gradio itself refuses local paths outside its upload folder; this also says no to what it lets
    through (URLs, inline data) and checks the folder again.
    """
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise UploadRejected(field, "Upload images as files (drag them in, browse, or paste).")
    path, url = value["path"], value.get("url") or ""
    if "://" in path or path.startswith("data:") or url.startswith("data:"):
        raise UploadRejected(field, "Images must be uploaded as files; URLs and inline data are not accepted.")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(cache_dir).resolve()) or not resolved.is_file():
        raise UploadRejected(field, "Images must be uploaded as files; that path is not an upload.")
    return resolved


def read_upload(value, cache_dir: str, max_bytes: int, field: str):
    """Decode one upload with `image_from_upload`: capped in bytes (`max_bytes`) and pixels, format from the bytes."""
    from .imageio import ImageInputError, image_from_upload  # PIL loads once the app runs, not on import
    from .limits import MAX_IMAGE_PIXELS

    path = upload_path(value, cache_dir, field)
    with open(path, "rb") as stream:  # one byte over the cap is enough to refuse it
        data = stream.read(max_bytes + 1)
    try:
        return image_from_upload(data, max_bytes=max_bytes, max_pixels=MAX_IMAGE_PIXELS)
    except ImageInputError as error:  # the reason only: the client's file name stays out of the page
        what = "image" if field == "image" else "reference image"
        raise UploadRejected(field, f"The {what} was rejected: {error.reason}.") from None


def upload_key(value) -> str | None:
    """What identifies an upload (gradio's path of it), to tell whether the uploads changed."""
    return value.get("path") if isinstance(value, dict) else None
